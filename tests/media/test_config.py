"""``roost serve`` media settings through the config system: flags, TOML,
ROOST_* (the S3 keys as ROOST_S3_ACCESS_KEY / ROOST_S3_SECRET_KEY), --print-config."""

from __future__ import annotations

import argparse
import tomllib
from pathlib import Path

import pytest

from roost.cli import serve_config
from roost.cli.errors import UsageError
from roost.cli.main import build_parser, media_config
from roost.media.config import byte_size, parse_s3


def settled(argv: list[str], env: dict[str, str]) -> argparse.Namespace:
    parser = build_parser()
    return serve_config.settle(parser, argv, parser.parse_args(argv), env)


def test_media_settings_from_file_environment_and_flags(tmp_path: Path) -> None:
    conf = tmp_path / "r.toml"
    conf.write_text(
        'media = "s3://media/roost?endpoint=http://127.0.0.1:9000&region=eu-west-1"\n'
        'media-max-image = "8MiB"\nmedia-quota = 1073741824\nmedia-retention-days = 7\n'
    )
    env = {"ROOST_S3_ACCESS_KEY": "AK", "ROOST_S3_SECRET_KEY": "SK", "ROOST_MEDIA_UPLOADS_PER_MINUTE": "5"}
    args = settled(["serve", "--config", str(conf), "--media-max-video", "1GiB"], env)
    config = media_config(args)
    assert config.is_s3 and (config.s3_access_key, config.s3_secret_key) == ("AK", "SK")
    limits = config.limits
    assert (limits.image_bytes, limits.video_bytes, limits.quota_bytes) == (8 << 20, 1 << 30, 1 << 30)
    assert (limits.retention_days, limits.uploads_per_minute) == (7.0, 5.0)
    where = parse_s3(config.location or "")
    assert (where.bucket, where.prefix, where.endpoint, where.region) == (
        "media",
        "roost/",
        "http://127.0.0.1:9000",
        "eu-west-1",
    )
    shown = serve_config.render(build_parser(), args)
    assert 's3_secret_key = "***"' in shown and "SK" not in shown
    again = tomllib.loads(shown)  # a valid --config file with the same values
    assert again["media_max_image"] == 8 << 20 and again["media_quota"] == 1 << 30


def test_defaults_are_local_media_with_the_documented_limits() -> None:
    config = media_config(settled(["serve"], {}))
    assert config.location is None and not config.is_s3
    assert config.limits.image_bytes == 16 << 20 and config.limits.file_bytes == 100 << 20
    assert config.limits.pending_hours == 24.0


@pytest.mark.parametrize(
    "text,value", [("16MiB", 16 << 20), ("100M", 100 << 20), ("2GiB", 2 << 30), ("65536", 65536)]
)
def test_byte_sizes(text: str, value: int) -> None:
    assert byte_size(text) == value


def test_bad_values_are_usage_errors(tmp_path: Path) -> None:
    with pytest.raises(UsageError):
        settled(["serve"], {"ROOST_MEDIA_MAX_IMAGE": "lots"})
    with pytest.raises(SystemExit):
        build_parser().parse_args(["serve", "--media-quota", "-1"])
    with pytest.raises(ValueError):
        parse_s3("s3://bucket?endpoint=http://x&colour=red")

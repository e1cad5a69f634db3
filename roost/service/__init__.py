"""Chat service layer: persist, look up, push or leave in the inbox."""

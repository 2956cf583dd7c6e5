"""Speculative decoding: proposers of draft tokens (and, to come, their verification)."""

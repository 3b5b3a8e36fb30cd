"""The T2S-DA method: one small module per piece, each a pure function or a small object."""

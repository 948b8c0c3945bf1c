//! KV-cache write tests (to be written).

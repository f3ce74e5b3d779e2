"""Sans-I/O protocol cores: bytes and `now` in, bytes and events out; no sockets, no clocks."""

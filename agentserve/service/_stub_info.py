"""Written by gen_stubs.py with the stubs: what they were generated from."""

PROTO_SHA256 = "59ca4489649bf77352db7de60d41c6d60e065c182bde0361c2334b9a4ef31d8b"
GRPCIO_TOOLS_VERSION = "1.84.0"

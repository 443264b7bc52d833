"""Written by gen_stubs.py with the stubs: what they were generated from."""

PROTO_SHA256 = "1592bc6ed329416be3e5ea894bbb3ecf0cf436775bd0ac558c7f030f4a00d029"
GRPCIO_TOOLS_VERSION = "1.84.0"

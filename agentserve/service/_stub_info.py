"""Written by gen_stubs.py with the stubs: what they were generated from."""

PROTO_SHA256 = "9f7c40c4464ce35fb8838a3a6c7f6f5b7402db5eabefcd5c59ff7c77e62e4445"
GRPCIO_TOOLS_VERSION = "1.84.0"

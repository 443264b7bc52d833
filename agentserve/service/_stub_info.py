"""Written by gen_stubs.py with the stubs: what they were generated from."""

PROTO_SHA256 = "49a39bbdff372be144fe788407948f2fce33d0b81bab86e9542d9f392536d0a1"
GRPCIO_TOOLS_VERSION = "1.84.0"

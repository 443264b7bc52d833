"""Written by gen_stubs.py with the stubs: what they were generated from."""

PROTO_SHA256 = "8ed84c25be0eb4eb81700a33e39815c6f9fa35b27af2faa27e8d11d37b22f6e0"
GRPCIO_TOOLS_VERSION = "1.84.0"

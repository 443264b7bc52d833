"""Written by gen_stubs.py with the stubs: what they were generated from."""

PROTO_SHA256 = "ed3652427e60cacc9a1417b3c1a250e0719d325539f752f24675445af3962333"
GRPCIO_TOOLS_VERSION = "1.84.0"

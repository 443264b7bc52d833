"""Written by gen_stubs.py with the stubs: what they were generated from."""

PROTO_SHA256 = "1344b6fb3a8cf045d2ba53d018797eb0f290b29ab26d32c004648806b65e1b45"
GRPCIO_TOOLS_VERSION = "1.84.0"

"""Written by gen_stubs.py with the stubs: what they were generated from."""

PROTO_SHA256 = "4b009ffeb12eaf62cfa7cd5a4d4b57a0b813b6743106e2468bd92a451e67617f"
GRPCIO_TOOLS_VERSION = "1.84.0"

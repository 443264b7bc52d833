"""Written by gen_stubs.py with the stubs: what they were generated from."""

PROTO_SHA256 = "3e4a3766eb4cb1f79a33b5a45aef5c203377c81605b9a4452957a27ad43e0137"
GRPCIO_TOOLS_VERSION = "1.84.0"

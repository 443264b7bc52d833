"""Written by gen_stubs.py with the stubs: what they were generated from."""

PROTO_SHA256 = "797d35b82756d9608926f51216d308480649c382a59429adbe85f018202e43a1"
GRPCIO_TOOLS_VERSION = "1.84.0"

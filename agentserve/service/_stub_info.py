"""Written by gen_stubs.py with the stubs: what they were generated from."""

PROTO_SHA256 = "818867ac81ee077e2b2f9a401a75204c1a847a53b76352614a2bd41639f64c6a"
GRPCIO_TOOLS_VERSION = "1.84.0"

"""Written by gen_stubs.py with the stubs: what they were generated from."""

PROTO_SHA256 = "b2052f93393243fca7abfea175ad696d4cc57a410fb53e6208720df274768934"
GRPCIO_TOOLS_VERSION = "1.84.0"

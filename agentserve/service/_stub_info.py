"""Written by gen_stubs.py with the stubs: what they were generated from."""

PROTO_SHA256 = "00ce7ede2b9e76e12e7458e48bcc63259eb6221b1252f8a77a1255fb8df65fd1"
GRPCIO_TOOLS_VERSION = "1.84.0"

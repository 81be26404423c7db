"""An S3-compatible server for tests: moto's (PyPI `moto[server]`, in target/tools-venv) on
127.0.0.1 at a free port. Prints the port once listening; stops when stdin closes.

Usage: s3_server.py
"""

import sys

from moto.server import ThreadedMotoServer


def main():
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    _, port = server.get_host_and_port()
    print(port, flush=True)
    sys.stdin.read()
    server.stop()


if __name__ == "__main__":
    main()

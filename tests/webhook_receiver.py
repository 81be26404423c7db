"""A webhook receiver for the tests: verifies every request with `standardwebhooks`, the
Standard Webhooks specification's reference library, and records what it got.

Usage: python webhook_receiver.py --secret whsec_... [--port N] [--status CODE]
                                  [--down-while PATH] --log FILE

Prints the port it listens on, then serves until killed. Each request appends one JSON line
to FILE: {"id", "timestamp", "verified", "accepted", "error", "payload"}. While PATH exists
every request is answered 503 (not accepted); otherwise one that verifies is answered with
--status (default 204, accepted when 2xx), one that does not with 401.
"""

import argparse
import json
import os
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from standardwebhooks.webhooks import Webhook


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--secret", required=True)
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--status", type=int, default=204)
    parser.add_argument("--log", required=True)
    parser.add_argument("--down-while")
    args = parser.parse_args()
    verifier = Webhook(args.secret)

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):
            body = self.rfile.read(int(self.headers.get("content-length", 0)))
            headers = {k.lower(): v for k, v in self.headers.items()}
            record = {
                "id": headers.get("webhook-id"),
                "timestamp": headers.get("webhook-timestamp"),
                "verified": False,
                "accepted": False,
                "error": None,
                "payload": None,
            }
            try:
                record["payload"] = verifier.verify(body, headers)
                record["verified"] = True
                status = args.status
                if args.down_while and os.path.exists(args.down_while):
                    status = 503
            except Exception as e:  # any refusal is recorded, and answered 401
                record["error"] = f"{type(e).__name__}: {e}"
                status = 401
            record["accepted"] = 200 <= status < 300
            with open(args.log, "a") as f:
                f.write(json.dumps(record) + "\n")
            self.send_response(status)
            self.send_header("content-length", "0")
            self.end_headers()

        def log_message(self, *_):
            pass

    ThreadingHTTPServer.allow_reuse_address = True
    server = ThreadingHTTPServer(("127.0.0.1", args.port), Handler)
    print(server.server_address[1], flush=True)
    server.serve_forever()


if __name__ == "__main__":
    sys.exit(main())

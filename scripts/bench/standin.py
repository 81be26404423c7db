"""A stand-in OpenAI-compatible model server for benchmarks: answers at once and does no image
work beyond decoding the request (GET /v1/models, POST /v1/chat/completions). Usage: standin.py PORT"""
import json, base64, http.server, sys
class H(http.server.BaseHTTPRequestHandler):
    def log_message(self, *a): pass
    def _send(self, obj):
        b = json.dumps(obj).encode()
        self.send_response(200); self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(b))); self.end_headers(); self.wfile.write(b)
    def do_GET(self):
        self._send({"object": "list", "data": [{"id": "stand-in"}]})
    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["content-length"])))
        parts = body["messages"][0]["content"]
        # One image, or a clip's images in time order (each after its text label).
        jpegs = [base64.b64decode(p["image_url"]["url"].split(",", 1)[1])
                 for p in parts if p.get("type") == "image_url"]
        what = (f"A frame of {len(jpegs[0])} bytes." if len(jpegs) == 1
                else f"A clip of {len(jpegs)} frames, {sum(map(len, jpegs))} bytes.")
        self._send({"choices": [{"index": 0, "message": {"role": "assistant",
            "content": f"{what} <i>markup stays text</i>"}}]})
http.server.ThreadingHTTPServer(("127.0.0.1", int(sys.argv[1])), H).serve_forever()

"""`tf-emnist serve` as a real server on a loopback port: TF Serving's REST API, uploads, bad requests, load."""
import io
import json
import os
import signal
import urllib.error
import urllib.request
import uuid
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from PIL import Image

from tests.conftest import run_cli, serving
from tf_emnist.export import export_model

pytestmark = pytest.mark.slow  # real processes and servers: the slow tier (make test-slow)

pytest.importorskip("starlette", reason="the serve extra is not installed: pip install '.[serve]'")


@pytest.fixture(scope="module")
def export(tiny_run, tmp_path_factory):
    return export_model(tiny_run, str(tmp_path_factory.mktemp("serve") / "models"))


@pytest.fixture(scope="module")
def server(export):
    """The CLI's server; stopped with SIGTERM at the end, gracefully."""
    with serving(export) as (url, process):
        yield url
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=30)
        # The app shut down cleanly (uvicorn then re-raises the signal, as a server should), and no request,
        # however bad, left a traceback in its log.
        log = process.stdout.read()
        assert "stopped serving merged" in log and "Traceback" not in log, log[-3000:]


def call(url: str, body: bytes | None = None, content_type: str = "application/json"):
    """(status, parsed JSON) of a GET (no body) or POST."""
    request = urllib.request.Request(url, data=body, headers={"Content-Type": content_type} if body else {})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def post_json(url: str, obj) -> tuple[int, dict]:
    return call(url, json.dumps(obj).encode())


def multipart(files: list[tuple[str, bytes]], fields: dict | None = None) -> tuple[bytes, str]:
    boundary = uuid.uuid4().hex
    parts = []
    for name, value in (fields or {}).items():
        parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n{value}\r\n'.encode())
    for filename, data in files:
        parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="files"; filename="{filename}"\r\n'
                     f"Content-Type: application/octet-stream\r\n\r\n".encode() + data + b"\r\n")
    return b"".join(parts) + f"--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"


def upload(url: str, files, **fields):
    body, content_type = multipart(files, fields)
    return call(url + "/predict", body, content_type)


def png_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, "PNG")
    return buffer.getvalue()


IMAGES = np.random.default_rng(0).integers(0, 256, (5, 28, 28), dtype=np.uint8)


def test_status_and_metadata_speak_tf_serving(server):
    status, body = call(server + "/v1/models/merged")
    assert status == 200 and body["model_version_status"] == [
        {"version": "1", "state": "AVAILABLE", "status": {"error_code": "OK", "error_message": ""}}]
    assert call(server + "/v1/models/merged/versions/1")[0] == 200
    status, body = call(server + "/v1/models/merged/metadata")
    signature = body["metadata"]["signature_def"]["signature_def"]["serving_default"]
    assert status == 200 and body["model_spec"] == {"name": "merged", "signature_name": "", "version": "1"}
    assert signature["inputs"]["images"]["dtype"] == "DT_UINT8"
    assert sorted(signature["outputs"]) == ["characters", "class_ids", "logits", "probabilities"]


def test_rest_predict_equals_plain_tensorflow(server, export):
    import tensorflow as tf

    expected = {k: v.numpy() for k, v in tf.saved_model.load(export).signatures["serving_default"](
        images=tf.constant(IMAGES)).items()}
    status, rows = post_json(server + "/v1/models/merged:predict", {"instances": IMAGES.tolist()})
    assert status == 200 and len(rows["predictions"]) == 5
    np.testing.assert_allclose([p["probabilities"] for p in rows["predictions"]], expected["probabilities"], atol=1e-4)
    assert [p["characters"] for p in rows["predictions"]] == [c.decode() for c in expected["characters"]]
    status, columns = post_json(server + "/v1/models/merged/versions/1:predict", {"inputs": {"images": IMAGES.tolist()}})
    assert status == 200 and columns["outputs"]["class_ids"] == expected["class_ids"].tolist()
    # Named row instances, and the stored (transposed) orientation's signature.
    status, stored = post_json(server + "/v1/models/merged:predict",
                               {"signature_name": "serve_stored",
                                "instances": [{"images": image.T.tolist()} for image in IMAGES]})
    assert status == 200 and [p["class_ids"] for p in stored["predictions"]] == expected["class_ids"].tolist()


def test_uploads_answer_as_the_predict_cli(server, export, tmp_path, capsys):
    from tf_emnist.synthetic import render_scan

    files = []
    for i, image in enumerate(IMAGES[:3]):
        path = tmp_path / f"char{i}.png"
        path.write_bytes(png_bytes(render_scan(np.where(image > 128, 255, 0).astype(np.uint8))))
        files.append(str(path))
    assert run_cli("predict", export, *files, "--json", "--top-k", 4) == 0
    expected = json.loads(capsys.readouterr().out)
    status, answers = upload(server, [(os.path.basename(f), open(f, "rb").read()) for f in files], top_k=4)
    assert status == 200
    assert [[t["character"] for t in a["top"]] for a in answers] == [[t["character"] for t in e["top"]]
                                                                      for e in expected]
    np.testing.assert_allclose([[t["probability"] for t in a["top"]] for a in answers],
                               [[t["probability"] for t in e["top"]] for e in expected], atol=1e-4)


def test_a_line_upload_is_segmented(server):
    line = np.full((60, 200), 255, np.uint8)
    for x in (20, 80, 140):
        line[15:45, x:x + 8] = 30  # three bars written apart
    status, answers = upload(server, [("line.png", png_bytes(line))], segment="true")
    assert status == 200 and len(answers[0]["characters"]) == 3 and len(answers[0]["text"]) == 3
    assert [c["box"][0] for c in answers[0]["characters"]] == sorted(c["box"][0] for c in answers[0]["characters"])


def bomb_png() -> bytes:
    buffer = io.BytesIO()
    Image.new("L", (20000, 20000), 255).save(buffer, "PNG")  # 400 megapixels in about 400 KB
    return buffer.getvalue()


BAD_REQUESTS = {
    "malformed JSON": ("/v1/models/merged:predict", b"{not json", 400, "not valid JSON"),
    "neither instances nor inputs": ("/v1/models/merged:predict", b'{"images": []}', 400, "exactly one of"),
    "wrong shape": ("/v1/models/merged:predict", json.dumps({"instances": [[1, 2, 3]]}).encode(), 400, "28x28"),
    "ragged": ("/v1/models/merged:predict", json.dumps({"instances": [[[0] * 28] * 28, [[0] * 27]]}).encode(), 400,
               "ragged"),
    "fractional pixels": ("/v1/models/merged:predict", json.dumps({"instances": [[[0.5] * 28] * 28]}).encode(), 400,
                          "integers"),
    "out of range": ("/v1/models/merged:predict", json.dumps({"instances": [[[300] * 28] * 28]}).encode(), 400,
                     "0-255"),
    "strings": ("/v1/models/merged:predict", json.dumps({"instances": [[["a"] * 28] * 28]}).encode(), 400,
                "integers"),
    "unknown signature": ("/v1/models/merged:predict",
                          json.dumps({"signature_name": "x", "instances": [[[0] * 28] * 28]}).encode(), 400,
                          "unknown signature_name"),
    "too many instances": ("/v1/models/merged:predict",
                           json.dumps({"instances": np.zeros((1025, 28, 28), int).tolist()}).encode(), 413,
                           "at most 1024"),
    "unknown model": ("/v1/models/other:predict", json.dumps({"instances": [[[0] * 28] * 28]}).encode(), 404,
                      "Servable not found"),
    "unknown version": ("/v1/models/merged/versions/7:predict",
                        json.dumps({"instances": [[[0] * 28] * 28]}).encode(), 404, "version served is 1"),
    "unknown path": ("/v2/anything", None, 404, "unknown path"),
    "nested 100,000 deep": ("/v1/models/merged:predict", b'{"instances": ' + b"[" * 100_000 + b"]" * 100_000 + b"}",
                            400, "not valid JSON"),
    "GET for :predict": ("/v1/models/merged:predict", None, 405, "use POST"),
}


@pytest.mark.parametrize("case", sorted(BAD_REQUESTS))
def test_bad_requests_get_a_json_error_and_the_server_keeps_serving(server, case):
    path, body, expected_status, message = BAD_REQUESTS[case]
    status, answer = call(server + path, body)
    assert status == expected_status and message in answer["error"], answer
    assert post_json(server + "/v1/models/merged:predict", {"instances": IMAGES[:1].tolist()})[0] == 200


BAD_UPLOADS = {
    "not an image": ([("notes.txt", b"hello")], {}, 415, "not a readable image"),
    "blank image": ([("blank.png", png_bytes(np.full((40, 40), 255, np.uint8)))], {}, 422, "blank"),
    "decompression bomb": ([("bomb.png", bomb_png())], {}, 413, "too many pixels"),
    "over the size limit": ([("big.png", b"\x89PNG" + bytes(11 * 2**20))], {}, 413, "limit"),
    "no files": ([], {"top_k": "3"}, 400, "no image"),
    "bad top_k": ([("a.png", png_bytes(IMAGES[0]))], {"top_k": "0"}, 400, "top_k"),
}


@pytest.mark.parametrize("case", sorted(BAD_UPLOADS))
def test_bad_uploads_get_a_json_error(server, case):
    files, fields, expected_status, message = BAD_UPLOADS[case]
    try:
        status, answer = upload(server, files, **fields)
    except (ConnectionError, urllib.error.URLError):  # the server may close an oversized request early
        assert expected_status == 413
    else:
        assert status == expected_status and message in answer["error"], answer
    assert post_json(server + "/v1/models/merged:predict", {"instances": IMAGES[:1].tolist()})[0] == 200


def test_a_client_that_leaves_mid_upload_costs_nothing(server):
    import socket
    from urllib.parse import urlsplit

    body, content_type = multipart([("a.png", png_bytes(IMAGES[0]) * 100)])
    address = urlsplit(server)
    with socket.create_connection((address.hostname, address.port), timeout=10) as client:
        client.sendall(f"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: {content_type}\r\n"
                       f"Content-Length: {len(body)}\r\n\r\n".encode() + body[:len(body) // 2])
    assert post_json(server + "/v1/models/merged:predict", {"instances": IMAGES[:1].tolist()})[0] == 200


def test_concurrent_clients_get_every_answer_right(server):
    expected = post_json(server + "/v1/models/merged:predict", {"instances": IMAGES.tolist()})[1]["predictions"]

    def client(i):
        answers = []
        for j in range(30):
            k = (i + j) % 5
            status, body = post_json(server + "/v1/models/merged:predict", {"instances": IMAGES[k:k + 1].tolist()})
            answers.append(status == 200 and body["predictions"][0]["class_ids"] == expected[k]["class_ids"])
        return answers

    with ThreadPoolExecutor(16) as pool:
        results = [ok for answers in pool.map(client, range(16)) for ok in answers]
    assert len(results) == 480 and all(results)


def test_the_page_names_the_model(server):
    with urllib.request.urlopen(server + "/", timeout=30) as response:
        page = response.read().decode()
    assert 'id="prediction"' in page and "<canvas" in page and "merged v1" in page
    assert "http" not in page.split("<script>")[1]  # no CDN: everything is served from here

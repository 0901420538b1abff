"""The Batch API through the official `openai` client: files (upload, validation with line
numbers, content), batches (create, retrieve, list with pagination, cancel), per account."""

from __future__ import annotations

import io
import json

import openai
import pytest

from coordinator.account_service import create_account


def _key(runtime, credit: int = 10**9) -> str:
    with runtime.session() as s:
        return create_account(s, "buyer", credit)[1]


def _client(client, key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url="http://testserver/v1", api_key=key, http_client=client, max_retries=0)


def _line(i: int, url: str = "/v1/chat/completions", **body) -> dict:
    body = {"model": "tiny", "messages": [{"role": "user", "content": f"hi {i}"}], "max_tokens": 4, **body}
    return {"custom_id": f"req-{i}", "method": "POST", "url": url, "body": body}


def _jsonl(lines) -> bytes:
    return "".join((ln if isinstance(ln, str) else json.dumps(ln)) + "\n" for ln in lines).encode()


def _upload(oc: openai.OpenAI, lines):
    return oc.files.create(file=("in.jsonl", io.BytesIO(_jsonl(lines))), purpose="batch")


def test_upload_create_retrieve_list_and_cancel_with_the_official_client(client, runtime):
    oc = _client(client, _key(runtime))
    f = _upload(oc, [_line(i) for i in range(3)])
    assert f.purpose == "batch" and f.bytes > 0 and f.id.startswith("file-")
    assert oc.files.retrieve(f.id).id == f.id
    assert oc.files.content(f.id).content == _jsonl([_line(i) for i in range(3)])
    made = [oc.batches.create(input_file_id=f.id, endpoint="/v1/chat/completions", completion_window="24h",
                              metadata={"n": str(i)}) for i in range(3)]
    b = oc.batches.retrieve(made[0].id)
    assert b.status in ("validating", "in_progress") and b.input_file_id == f.id and b.metadata == {"n": "0"}
    assert b.request_counts.total == 3
    first = oc.batches.list(limit=2)
    assert [x.id for x in first.data] == [made[2].id, made[1].id] and first.has_more
    rest = oc.batches.list(limit=2, after=first.data[-1].id)
    assert [x.id for x in rest.data] == [made[0].id] and not rest.has_more
    assert [x.id for x in oc.batches.list(limit=2)] == [m.id for m in reversed(made)]
    cancelled = oc.batches.cancel(made[1].id)
    assert cancelled.status == "cancelling" and cancelled.cancelling_at is not None


def test_files_are_listed_in_pages_and_deleted_with_the_official_client(client, runtime):
    oc = _client(client, _key(runtime))
    made = [_upload(oc, [_line(i)]) for i in range(3)]
    first = oc.files.list(limit=2)  # newest first
    assert [f.id for f in first.data] == [made[2].id, made[1].id] and first.has_more
    assert [f.id for f in oc.files.list(limit=2, after=made[1].id).data] == [made[0].id]
    assert [f.id for f in oc.files.list()] == [m.id for m in reversed(made)]  # the client pages through all
    assert [f.id for f in oc.files.list(order="asc", limit=10).data] == [m.id for m in made]
    assert [f.id for f in oc.files.list(purpose="batch_output").data] == []

    gone = oc.files.delete(made[0].id)
    assert gone.id == made[0].id and gone.deleted
    for call in (lambda: oc.files.retrieve(made[0].id), lambda: oc.files.content(made[0].id),
                 lambda: oc.files.delete(made[0].id)):
        with pytest.raises(openai.NotFoundError):
            call()
    assert not (runtime.settings.home / "files" / made[0].id).exists()  # its bytes too
    assert (runtime.settings.home / "files" / made[2].id).exists()
    assert [f.id for f in oc.files.list()] == [made[2].id, made[1].id]

    # the input of a batch still running cannot be deleted (its runner reads it); after cancel it can
    b = oc.batches.create(input_file_id=made[1].id, endpoint="/v1/chat/completions", completion_window="24h")
    with pytest.raises(openai.ConflictError, match="still running"):
        oc.files.delete(made[1].id)
    assert oc.files.retrieve(made[1].id).id == made[1].id
    with runtime.session() as s:  # the runner has ended it
        from coordinator.models import Batch
        s.get(Batch, b.id).status = "cancelled"
    assert oc.files.delete(made[1].id).deleted
    with pytest.raises(openai.BadRequestError):
        oc.files.list(order="sideways")


def test_another_account_sees_neither_files_nor_batches(client, runtime):
    mine, theirs = _client(client, _key(runtime)), _client(client, _key(runtime))
    f = _upload(mine, [_line(0)])
    b = mine.batches.create(input_file_id=f.id, endpoint="/v1/chat/completions", completion_window="24h")
    for call in (lambda: theirs.files.retrieve(f.id), lambda: theirs.files.content(f.id),
                 lambda: theirs.files.delete(f.id),
                 lambda: theirs.batches.retrieve(b.id), lambda: theirs.batches.cancel(b.id),
                 lambda: theirs.batches.create(input_file_id=f.id, endpoint="/v1/chat/completions",
                                               completion_window="24h")):
        with pytest.raises(openai.NotFoundError):
            call()
    assert theirs.batches.list().data == [] and theirs.files.list().data == []
    assert mine.files.retrieve(f.id).id == f.id  # their delete did nothing


@pytest.mark.parametrize("lines, line_no, words", [
    (['{"custom_id": "a"', ], 1, "not valid JSON"),
    ([_line(0), {k: v for k, v in _line(1).items() if k != "custom_id"}], 2, "custom_id is missing"),
    ([_line(0), _line(1), _line(0)], 3, "duplicate custom_id 'req-0'"),
    ([{**_line(0), "method": "GET"}], 1, "method must be POST"),
    ([{**_line(0), "url": "/v1/embeddings"}], 1, "url must be one of"),
    ([_line(0), _line(1, temperature=7)], 2, "body.temperature"),
    ([_line(0), _line(1, url="/v1/completions")], 2, "one endpoint per batch"),
    ([_line(0), _line(1, model="other")], 2, "one model per batch"),
    ([_line(0, stream=True)], 1, "stream is not supported"),
    ([_line(0), _line(1, response_format={"type": "json_object"})], 2, "response_format 'json_object' is not supported"),
    ([], 1, "no requests"),
])
def test_an_invalid_file_is_refused_with_the_line_that_is_wrong(client, runtime, lines, line_no, words):
    oc = _client(client, _key(runtime))
    with pytest.raises(openai.BadRequestError) as exc:
        _upload(oc, lines)
    err = exc.value.body
    assert err["param"] == "file" and f"line {line_no}: " in err["message"] and words in err["message"]


def test_bad_parameters_are_4xx_naming_the_parameter(client, runtime):
    key = _key(runtime)
    oc, auth = _client(client, key), {"Authorization": f"Bearer {key}"}
    with pytest.raises(openai.BadRequestError) as exc:
        oc.files.create(file=("x.jsonl", io.BytesIO(_jsonl([_line(0)]))), purpose="fine-tune")
    assert exc.value.body["param"] == "purpose"
    f = _upload(oc, [_line(0)])
    for kw, param in (({"endpoint": "/v1/embeddings"}, "endpoint"), ({"completion_window": "1h"}, "completion_window")):
        args = {"input_file_id": f.id, "endpoint": "/v1/chat/completions", "completion_window": "24h", **kw}
        with pytest.raises(openai.BadRequestError) as exc:
            oc.batches.create(**args)
        assert exc.value.body["param"] == param
    with pytest.raises(openai.NotFoundError):
        oc.batches.create(input_file_id="file-nope", endpoint="/v1/chat/completions", completion_window="24h")
    assert client.get("/v1/batches?limit=0", headers=auth).status_code == 400
    nope = client.get("/v1/batches?after=batch_nope", headers=auth)
    assert nope.status_code == 404 and nope.json()["error"]["param"] == "after"
    assert client.post("/v1/files", headers=auth, data={"purpose": "batch"}).status_code == 400  # no file part


def test_a_file_over_the_size_limit_is_413(tmp_path, runtime):
    from fastapi.testclient import TestClient

    from coordinator.app import create_app

    runtime.settings.batch_file_max_bytes = 2048
    with TestClient(create_app(runtime=runtime)) as c:
        oc = _client(c, _key(runtime))
        with pytest.raises(openai.APIStatusError) as exc:
            _upload(oc, [_line(i) for i in range(40)])
        assert exc.value.status_code == 413

"""JSON files that a user or a crash can leave damaged (a latent-shard folder's latents.json, a shard index.json, a
checkpoint's state.json, a layout file): each is a one-line error of the caller's kind that names the file."""

import pytest

from latentdiff.data.latent_shards import META_FILE, read_meta
from latentdiff.data.shards import INDEX_FILE, shard_index_total
from latentdiff.errors import CheckpointError, DataError, RequestError
from latentdiff.fileio import read_json
from latentdiff.folders import read_state


@pytest.mark.parametrize("text, message", [
    ('{"a": 1', "is not valid JSON"),
    ("\xff\xfe", "is not valid JSON"),
    ("[1, 2]", "expected an object in JSON, got an array"),
    ("null", "expected an object in JSON, got null"),
])
def test_read_json_names_the_file_in_the_callers_error(tmp_path, text, message):
    path = tmp_path / "x.json"
    path.write_bytes(text.encode("latin-1"))
    with pytest.raises(CheckpointError, match=message) as info:
        read_json(path, CheckpointError)
    assert str(path) in str(info.value) and "\n" not in str(info.value)


def test_read_json_any_value_with_expect_none(tmp_path):
    path = tmp_path / "x.json"
    path.write_text('[{"shape": "circle"}]')
    assert read_json(path, RequestError, expect=None) == [{"shape": "circle"}]
    assert read_json(path, RequestError, expect=list) == [{"shape": "circle"}]


def test_damaged_latent_shard_meta_and_index_are_data_errors(tmp_path):
    (tmp_path / META_FILE).write_text('{"autoencoder_sha256": "ab')  # truncated by a crash
    with pytest.raises(DataError, match=META_FILE):
        read_meta(tmp_path)
    (tmp_path / INDEX_FILE).write_text("[]")
    with pytest.raises(DataError, match="expected an object"):
        shard_index_total([str(tmp_path / "shard-000000.tar")])


def test_damaged_checkpoint_state_is_a_checkpoint_error(tmp_path):
    (tmp_path / "state.json").write_text('["step", 3]')
    with pytest.raises(CheckpointError, match="state.json: expected an object"):
        read_state(tmp_path)

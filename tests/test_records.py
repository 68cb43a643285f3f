"""The wire codec (fedseg.federation.records) and the packed site state (federation.site)."""

from __future__ import annotations

import io
from typing import Any

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord

from fedseg.errors import UpdateValidationError
from fedseg.federation import records as R
from fedseg.federation.site import pack_arrays, saved_round_state, unpack_arrays

ARRAYS = [
    np.arange(12, dtype=np.float32).reshape(3, 4),
    np.arange(5, dtype=np.int64),
    np.array([True, False, True]),
    np.zeros((0, 3), dtype=np.float32),
    np.float64(2.5) * np.ones(()),  # 0-d: sent as shape (1,), as Flower's own path does
    np.arange(6, dtype=">f4").reshape(2, 3),  # big-endian
    np.arange(24, dtype=np.float64).reshape(2, 3, 4)[:, ::2],  # not contiguous
    np.zeros((1,) * 40, dtype=np.float32),  # a header too long for .npy format 1.0
]


def _np_save(a: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, np.ascontiguousarray(a), allow_pickle=False)
    return buffer.getvalue()


@pytest.mark.parametrize("a", ARRAYS, ids=lambda a: f"{a.dtype.str}{list(np.shape(a))}")
def test_encoding_is_byte_for_byte_np_save(a: np.ndarray) -> None:
    enc = R.encode_array(a)
    assert enc.data == _np_save(a)  # what Flower's Array(ndarray) holds
    assert enc.stype == Array(np.ascontiguousarray(a)).stype
    assert (enc.dtype, tuple(enc.shape)) == (str(a.dtype), np.ascontiguousarray(a).shape)
    np.testing.assert_array_equal(enc.numpy(), np.ascontiguousarray(a))  # Flower reads it


@pytest.mark.parametrize("a", ARRAYS, ids=lambda a: f"{a.dtype.str}{list(np.shape(a))}")
def test_decoding_reads_flowers_own_arrays(a: np.ndarray) -> None:
    want = np.ascontiguousarray(a)
    for arr in (Array(want), Array(np.asfortranarray(want)), R.encode_array(a)):
        got = R.decode_array(arr)
        assert got.dtype == want.dtype and got.shape == want.shape
        np.testing.assert_array_equal(got, want)


def test_decoded_arrays_are_writable_copies() -> None:
    rec = R.to_array_record({"w": np.ones((2, 2), dtype=np.float32)})
    got = R.from_array_record(rec)["w"]
    got += 1.0  # in place: must not raise, and must not change the record
    np.testing.assert_array_equal(R.from_array_record(rec)["w"], np.ones((2, 2)))
    order = R.from_array_record(R.to_array_record({"b": np.zeros(1), "a": np.zeros(1)}))
    assert list(order) == ["b", "a"]


def test_a_declared_dtype_that_lies_is_decoded_as_the_header_says() -> None:
    # The Array claims float32 but carries a float64 .npy: the fast path does not apply and the
    # header wins, so validation sees the real dtype (and refuses it).
    honest = Array(np.arange(4, dtype=np.float64))
    liar = Array(dtype="float32", shape=(4,), stype=honest.stype, data=honest.data)
    got = R.decode_array(liar)
    assert got.dtype == np.float64
    np.testing.assert_array_equal(got, np.arange(4))


@pytest.mark.parametrize(
    "data",
    [
        _np_save(np.arange(4, dtype=np.float32))[:-3],  # truncated
        b"not an npy file at all",
        b"\x93NUMPY\x01\x00",  # a magic string and nothing else
    ],
)
def test_damaged_entries_raise_value_error(data: bytes) -> None:
    arr = Array(dtype="float32", shape=(4,), stype="numpy.ndarray", data=data)
    with pytest.raises(ValueError):
        R.decode_array(arr)


def test_object_arrays_are_never_unpickled() -> None:
    header = b"\x93NUMPY\x01\x00" + (118).to_bytes(2, "little")
    text = "{'descr': '|O', 'fortran_order': False, 'shape': (1,), }"
    data = header + text.encode().ljust(117) + b"\n" + b"\x80\x04."
    with pytest.raises(ValueError):
        R.decode_array(Array(dtype="object", shape=(1,), stype="numpy.ndarray", data=data))
    with pytest.raises(ValueError):
        R.from_array_record(
            ArrayRecord({"x": Array(dtype="float32", shape=(1,), stype="other", data=b"")})
        )


# --------------------------------------------------------------------- packed site state


def test_many_same_typed_arrays_pack_into_one_and_back() -> None:
    rng = np.random.default_rng(0)
    named = {f"layer{i}.weight": rng.normal(size=(i + 1, 3)).astype(np.float32) for i in range(9)}
    packed = pack_arrays(named)
    assert packed["packed-values"].shape == (sum(3 * (i + 1) for i in range(9)),)
    assert packed["packed-names"] == list(named)
    back = unpack_arrays(packed)
    assert list(back) == list(named)
    for k, v in named.items():
        np.testing.assert_array_equal(back[k], v)
        assert back[k].dtype == v.dtype


def test_small_or_mixed_dicts_are_kept_as_they_are() -> None:
    small = {"params": np.arange(3), "param.exp_avg": np.zeros(3, dtype=np.float32)}
    assert pack_arrays(small).keys() == small.keys()
    mixed = {f"k{i}": np.zeros(2, dtype=np.float32 if i % 2 else np.float64) for i in range(10)}
    assert pack_arrays(mixed).keys() == mixed.keys()
    assert unpack_arrays(small).keys() == small.keys()


def test_a_damaged_packed_state_is_refused() -> None:
    named = {f"k{i}": np.zeros(2, dtype=np.float32) for i in range(8)}
    packed = pack_arrays(named)
    packed["packed-values"] = packed["packed-values"][:-1]
    with pytest.raises(UpdateValidationError, match="do not agree"):
        unpack_arrays(packed)


def test_a_saved_round_comes_back_unpacked_and_owned() -> None:
    import torch

    from fedseg.federation.checkpoint import to_torch

    named = {f"k{i}": np.full(2, i, dtype=np.float32) for i in range(8)}
    stored = to_torch({"fedbn-local": pack_arrays(named), "optimizer": {"params": np.arange(2)}})
    got = saved_round_state(stored)
    np.testing.assert_array_equal(got["fedbn-local"]["k5"], [5.0, 5.0])
    got["fedbn-local"]["k5"] += 1.0  # the caller's copy, not the stored tensor
    assert torch.equal(stored["fedbn-local"]["packed-values"][10:12], torch.full((2,), 5.0))
    np.testing.assert_array_equal(got["optimizer"]["params"], [0, 1])


def test_flat_record_round_trip_and_wrong_layout() -> None:
    arrays = [np.arange(6, dtype=np.float32).reshape(2, 3), np.array([7.0], np.float32)]
    rec = R.to_flat_record(arrays)
    assert list(rec) == [R.FLAT]  # one Array: one header, one copy
    np.testing.assert_array_equal(rec[R.FLAT].numpy(), [0, 1, 2, 3, 4, 5, 7])
    got = R.from_flat_record(rec, [(2, 3), (1,)], "scaffold-correction")
    for a, b in zip(got, arrays, strict=True):
        np.testing.assert_array_equal(a, b)
        assert a.dtype == b.dtype
    with pytest.raises(
        ValueError, match=r"'scaffold-correction' has shape \(7,\), expected \(8,\)"
    ):
        R.from_flat_record(rec, [(2, 3), (2,)], "scaffold-correction")
    rec["other"] = R.encode_array(np.zeros(1))
    with pytest.raises(ValueError, match="must hold one entry 'values'"):
        R.from_flat_record(rec, [(2, 3), (1,)], "scaffold-correction")


# --------------------------------------------------------------------- the wire: packed per dtype


def test_a_model_travels_as_one_array_per_dtype_and_comes_back_in_order() -> None:
    rng = np.random.default_rng(1)
    named = {
        "enc.weight": rng.normal(size=(4, 2, 3, 3, 3)).astype(np.float32),
        "steps": np.array(7, dtype=np.int64),
        "enc.bias": rng.normal(size=(4,)).astype(np.float32),
        "empty": np.zeros((0, 3), dtype=np.float32),
        "dec.weight": rng.normal(size=(2, 4, 1, 1, 1)).astype(np.float32),
    }
    rec = R.to_array_record(named)
    assert len(rec) == 2  # float32 and int64: two Flower objects, not five
    assert all(k.startswith(R.PACKED) for k in rec)
    back = R.from_array_record(rec)
    assert list(back) == list(named)
    for k, v in named.items():
        np.testing.assert_array_equal(back[k], v)
        assert back[k].dtype == v.dtype and back[k].shape == v.shape
    back["enc.bias"][0] = 99.0  # writable, and not aliasing another entry
    assert back["enc.weight"].ravel()[-1] == named["enc.weight"].ravel()[-1]


def test_the_one_entry_per_name_form_is_still_read() -> None:
    named = {"a": np.arange(3, dtype=np.float32), "b": np.ones((2, 2), dtype=np.float64)}
    rec = ArrayRecord({k: R.encode_array(v) for k, v in named.items()})
    back = R.from_array_record(rec)
    assert list(back) == ["a", "b"]
    np.testing.assert_array_equal(back["b"], named["b"])


def test_flowers_average_by_key_of_packed_records_is_the_average_model() -> None:
    # Flower's strategies aggregate ArrayRecords key by key: packed records of one model
    # layout share their keys, so the average of the flat arrays is the average model.
    a = {"w": np.array([1.0, 3.0], np.float32), "b": np.array([2.0], np.float32)}
    b = {"w": np.array([3.0, 5.0], np.float32), "b": np.array([4.0], np.float32)}
    ra, rb = R.to_array_record(a), R.to_array_record(b)
    assert list(ra) == list(rb)
    key = next(iter(ra))
    mean = ArrayRecord({key: R.encode_array((ra[key].numpy() + rb[key].numpy()) / 2)})
    got = R.from_array_record(mean)
    np.testing.assert_array_equal(got["w"], [2.0, 4.0])
    np.testing.assert_array_equal(got["b"], [3.0])


@pytest.mark.parametrize(
    ("layout", "values", "match"),
    [
        ("not json", np.zeros(2, np.float32), "not JSON"),
        ('{"a": 1}', np.zeros(2, np.float32), "must be a list"),
        ('[[0,"a",[-1]]]', np.zeros(2, np.float32), "non-negative"),
        ('[[0,"a",[2.5]]]', np.zeros(2, np.float32), "non-negative int sizes"),
        ('[[0,"a",[3]]]', np.zeros(2, np.float32), "for its layout"),
        ('[[0,"a",[1]],[1,"a",[1]]]', np.zeros(2, np.float32), "names an array twice"),
        ('[[0,"a",[1]],[0,"b",[1]]]', np.zeros(2, np.float32), "same position"),
        ('[[0,"a",[2]]]', np.zeros((1, 2), np.float32), "one-dimensional"),
    ],
)
def test_a_malformed_packed_entry_is_a_value_error(
    layout: str, values: np.ndarray, match: str
) -> None:
    rec = ArrayRecord({R.PACKED + layout: R.encode_array(values)})
    with pytest.raises(ValueError, match=match):
        R.from_array_record(rec)


def test_a_query_reply_s_arrays_are_decoded_or_refused_with_the_reason() -> None:
    from types import SimpleNamespace

    from flwr.app import RecordDict

    from fedseg.errors import UpdateValidationError

    def reply(content: RecordDict) -> Any:
        return SimpleNamespace(has_content=lambda: True, content=content)

    good = reply(RecordDict({R.ARRAYS: R.to_array_record({"f": np.ones(2)})}))
    np.testing.assert_array_equal(R.reply_arrays(good)["f"], [1.0, 1.0])
    lost = SimpleNamespace(has_content=lambda: False, error=SimpleNamespace(reason="node offline"))
    with pytest.raises(UpdateValidationError, match="no reply content \\(node offline\\)"):
        R.reply_arrays(lost)
    with pytest.raises(UpdateValidationError, match="no 'arrays' record"):
        R.reply_arrays(reply(RecordDict()))
    with pytest.raises(UpdateValidationError, match="the site failed"):
        R.reply_arrays(reply(R.error_content(RuntimeError("x"), "site-0")))
    bad = ArrayRecord({R.PACKED + '[[0,"f",[3]]]': R.encode_array(np.ones(2))})
    with pytest.raises(UpdateValidationError, match="cannot be decoded"):
        R.reply_arrays(reply(RecordDict({R.ARRAYS: bad})))

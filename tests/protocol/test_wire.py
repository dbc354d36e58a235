"""The struct codecs of the hot path decode exactly what the construct schemas describe."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mediator.vfio_user import wire
from mediator.vfio_user.wire import Codec

SCHEMAS = {
    "Header": wire.Header,
    "DmaMap": wire.DmaMap,
    "DmaUnmap": wire.DmaUnmap,
    "DeviceInfo": wire.DeviceInfo,
    "RegionInfo": wire.RegionInfo,
    "CapabilityHeader": wire.CapabilityHeader,
    "SparseMmap": wire.SparseMmap,
    "SparseArea": wire.SparseArea,
    "IrqInfo": wire.IrqInfo,
    "SetIrqs": wire.SetIrqs,
    "RegionAccess": wire.RegionAccess,
    "WriteMultiEntry": wire.WriteMultiEntry,
    "DeviceFeature": wire.DeviceFeature,
}


@pytest.mark.parametrize("name", sorted(SCHEMAS))
def test_struct_and_construct_agree_on_the_layout_size(name: str) -> None:
    schema = SCHEMAS[name]
    assert Codec(schema).size == schema.sizeof()


@pytest.mark.parametrize("name", sorted(SCHEMAS))
@given(data=st.data())
def test_struct_and_construct_decode_the_same_bytes_identically(name: str, data: st.DataObject) -> None:
    schema = SCHEMAS[name]
    codec = Codec(schema)
    raw = data.draw(st.binary(min_size=codec.size, max_size=codec.size))
    parsed = schema.parse(raw)
    assert codec.unpack_from(raw) == tuple(parsed[field] for field in codec.fields)
    assert codec.pack(*codec.unpack_from(raw)) == raw == schema.build(parsed)


def test_the_hot_path_codecs_are_the_schemas() -> None:
    assert wire.HEADER.fields == ["msg_id", "command", "size", "flags", "error"]
    assert wire.REGION_ACCESS.fields == ["offset", "region", "count"]
    assert wire.HEADER.size == 16 and wire.REGION_ACCESS.size == 16

"""ONNX protobuf helpers shared by the exporter and the ONNX-file front end (onnx only, no
torch)."""

from __future__ import annotations

from typing import Any

__all__ = ["weight_free"]

_LIGHT_MAX = 256  # initializers with more elements leave the checked view (floats only)


def weight_free(proto: Any) -> Any:
    """A copy of ``proto`` whose large float initializers are graph inputs of the same name,
    type and shape: what the checker and shape inference see of them is unchanged (data
    propagation reads only small integer tensors, which stay). Each one left out must hold
    exactly its dims' worth of data."""
    import onnx
    from onnx import TensorProto, helper

    floats = {TensorProto.FLOAT, TensorProto.DOUBLE, TensorProto.FLOAT16, TensorProto.BFLOAT16}
    light = onnx.ModelProto()
    for f in ("ir_version", "producer_name", "producer_version", "domain", "model_version",
              "doc_string"):
        setattr(light, f, getattr(proto, f))
    light.opset_import.extend(proto.opset_import)
    light.metadata_props.extend(proto.metadata_props)
    light.functions.extend(proto.functions)
    g, lg = proto.graph, light.graph
    lg.name, lg.doc_string = g.name, g.doc_string
    lg.node.extend(g.node)
    lg.input.extend(g.input)
    lg.output.extend(g.output)
    lg.value_info.extend(g.value_info)
    lg.sparse_initializer.extend(g.sparse_initializer)
    names = {i.name for i in g.input}
    for t in g.initializer:
        n = 1
        for d in t.dims:
            n *= d
        if (t.data_type not in floats or n <= _LIGHT_MAX or t.data_location != 0
                or not t.HasField("raw_data")):
            lg.initializer.append(t)  # checked in full
            continue
        size = n * helper.tensor_dtype_to_np_dtype(t.data_type).itemsize
        if _raw_data_len(t) != size:
            raise ValueError(f"initializer {t.name!r} holds {_raw_data_len(t)} bytes, its "
                              f"shape {list(t.dims)} needs {size}")
        if t.name not in names:
            lg.input.append(helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)))
    return light


def _raw_data_len(t: Any) -> int:
    """``len(t.raw_data)`` without copying the bytes out of the message: its serialised size
    less that of the same tensor without ``raw_data``, less the field's tag and length
    prefix."""
    from onnx import TensorProto

    head = TensorProto()
    for fd in t.DESCRIPTOR.fields:  # every field but raw_data (small: names, dims, metadata)
        if fd.name == "raw_data":
            continue
        value = getattr(t, fd.name)
        repeated = getattr(fd, "is_repeated", None)  # protobuf ≥ 5; older: label
        if repeated is None:
            repeated = fd.label == fd.LABEL_REPEATED
        if repeated:
            if len(value):
                getattr(head, fd.name).extend(value)
        elif t.HasField(fd.name):
            if fd.message_type is not None:
                getattr(head, fd.name).CopyFrom(value)
            else:
                setattr(head, fd.name, value)
    rest = t.ByteSize() - head.ByteSize() - 1  # the raw_data field's one-byte tag
    for k in range(1, 11):  # its varint length prefix takes k bytes
        if rest - k >= 0 and _varint_size(rest - k) == k:
            return rest - k
    return -1


def _varint_size(n: int) -> int:
    size = 1
    while n >= 0x80:
        n >>= 7
        size += 1
    return size

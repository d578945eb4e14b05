"""Just enough ONNX protobuf rewriting to make the shipped Moonshine graphs fast.

The Moonshine ``.ort`` files store each weight as int8 plus a scale and an
offset, dequantised by Cast -> Mul -> Add nodes. ONNX Runtime does not
constant-fold ORT-format models, so every decoder step re-dequantised all
~41 M weights (130 ms a token). onnxruntime can re-save a loaded ``.ort``
model as ONNX, and this module then rewrites that protobuf: it replaces each
dequantisation chain by one float initializer (computed once, here) and
names the ``If`` node's subgraphs, which the re-saved file leaves unnamed and
ONNX validation rejects. Only the wire format is handled, so no ``onnx``
package is needed.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass
from typing import BinaryIO

import numpy as np

log = logging.getLogger(__name__)

# Field numbers from onnx.proto3.
_MODEL_GRAPH = 7
_GRAPH_NODE, _GRAPH_NAME, _GRAPH_INITIALIZER, _GRAPH_OUTPUT = 1, 2, 5, 12
_NODE_INPUT, _NODE_OUTPUT, _NODE_OP_TYPE, _NODE_ATTRIBUTE = 1, 2, 4, 5
_ATTR_NAME, _ATTR_I, _ATTR_G, _ATTR_GRAPHS = 1, 3, 6, 11
_TENSOR_DIMS, _TENSOR_TYPE, _TENSOR_FLOATS, _TENSOR_NAME, _TENSOR_RAW = 1, 2, 4, 8, 9
_FLOAT, _UINT8, _INT8 = 1, 2, 3
_VARINT, _I64, _LEN, _I32 = 0, 1, 2, 5


class OnnxFormatError(ValueError):
    """The bytes are not the protobuf this module understands."""


@dataclass(frozen=True)
class _Field:
    """One protobuf field: its number, wire type, full encoding and LEN payload."""

    number: int
    wire_type: int
    encoded: memoryview
    payload: memoryview  # LEN fields: the contents; varints: empty; fixed: the raw bytes

    @property
    def value(self) -> int:
        """The varint value of a VARINT field."""
        return _read_varint(self.encoded, _read_varint(self.encoded, 0)[1])[0]


def _read_varint(buf: bytes | memoryview, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        if pos >= len(buf):
            raise OnnxFormatError("truncated varint")
        byte = buf[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        shift += 7
        if byte < 0x80:
            return result, pos


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        low, value = value & 0x7F, value >> 7
        out.append(low | (0x80 if value else 0))
        if not value:
            return bytes(out)


def _fields(data: bytes | memoryview) -> Iterator[_Field]:
    buf = memoryview(data)  # slices of a memoryview share the buffer: no copies
    pos = 0
    while pos < len(buf):
        key, body = _read_varint(buf, pos)
        number, wire_type = key >> 3, key & 7
        if wire_type == _VARINT:
            end = _read_varint(buf, body)[1]
            yield _Field(number, wire_type, buf[pos:end], buf[end:end])
        elif wire_type == _LEN:
            size, start = _read_varint(buf, body)
            end = start + size
            yield _Field(number, wire_type, buf[pos:end], buf[start:end])
        elif wire_type in (_I64, _I32):
            end = body + (8 if wire_type == _I64 else 4)
            yield _Field(number, wire_type, buf[pos:end], buf[body:end])
        else:
            raise OnnxFormatError(f"unsupported protobuf wire type {wire_type}")
        if end > len(buf):
            raise OnnxFormatError("field runs past the end of its message")
        pos = end


def _len_field(number: int, payload: bytes | memoryview) -> bytes:
    return _varint(number << 3 | _LEN) + _varint(len(payload)) + payload


def _len_header(number: int, size: int) -> bytes:
    return _varint(number << 3 | _LEN) + _varint(size)


def _strings(message: memoryview, number: int) -> list[str]:
    return [bytes(f.payload).decode() for f in _fields(message) if f.number == number]


@dataclass
class _Tensor:
    """The parts of a TensorProto that dequantisation needs."""

    name: str
    dims: list[int]
    data_type: int
    data: memoryview  # raw_data, or packed float_data

    @classmethod
    def parse(cls, message: memoryview) -> _Tensor:
        name, dims, data_type, data = "", [], 0, memoryview(b"")
        for f in _fields(message):
            if f.number == _TENSOR_DIMS and f.wire_type == _VARINT:
                dims.append(f.value)
            elif f.number == _TENSOR_DIMS:  # packed
                pos = 0
                while pos < len(f.payload):
                    dim, pos = _read_varint(f.payload, pos)
                    dims.append(dim)
            elif f.number == _TENSOR_TYPE:
                data_type = f.value
            elif f.number == _TENSOR_NAME:
                name = bytes(f.payload).decode()
            elif f.number in (_TENSOR_RAW, _TENSOR_FLOATS) and f.wire_type == _LEN:
                data = f.payload
        return cls(name, dims, data_type, data)

    def array(self) -> np.ndarray | None:
        """The values, when stored in a way this module reads; else None."""
        dtype = {_FLOAT: "<f4", _UINT8: "u1", _INT8: "i1"}.get(self.data_type)
        count = int(np.prod(self.dims)) if self.dims else 1
        if dtype is None or self.data.nbytes != count * np.dtype(dtype).itemsize:
            return None
        return np.frombuffer(self.data, dtype).reshape(self.dims)


def _float_tensor(name: str, values: np.ndarray) -> bytes:
    """An encoded float TensorProto holding `values` as raw data."""
    out = bytearray()
    for dim in values.shape:
        out += _varint(_TENSOR_DIMS << 3 | _VARINT) + _varint(dim)
    out += _varint(_TENSOR_TYPE << 3 | _VARINT) + _varint(_FLOAT)
    out += _len_field(_TENSOR_NAME, name.encode())
    out += _len_field(_TENSOR_RAW, np.ascontiguousarray(values, "<f4").tobytes())
    return bytes(out)


@dataclass
class _Node:
    op_type: str
    inputs: list[str]
    outputs: list[str]
    encoded: memoryview

    @classmethod
    def parse(cls, message: memoryview) -> _Node:
        op_type = next(
            (bytes(f.payload).decode() for f in _fields(message) if f.number == _NODE_OP_TYPE), ""
        )
        inputs, outputs = _strings(message, _NODE_INPUT), _strings(message, _NODE_OUTPUT)
        return cls(op_type, inputs, outputs, message)

    def int_attribute(self, name: str) -> int | None:
        for f in _fields(self.encoded):
            if f.number == _NODE_ATTRIBUTE:
                attrs = {a.number: a for a in _fields(f.payload)}
                if _ATTR_NAME in attrs and bytes(attrs[_ATTR_NAME].payload).decode() == name:
                    return attrs[_ATTR_I].value if _ATTR_I in attrs else None
        return None


def prepare_model(model: bytes, out: BinaryIO) -> None:
    """Write `model` to `out` with dequantisation folded and subgraphs named.

    The output (float weights: ~4x the input) is streamed to `out` part by
    part, so it is never held twice in memory.
    """
    counter = [0]
    for f in _fields(model):
        if f.number == _MODEL_GRAPH and f.wire_type == _LEN:
            parts = _rewrite_graph(f.payload, counter, top=True)
            out.write(_len_header(_MODEL_GRAPH, sum(len(p) for p in parts)))
            while parts:
                out.write(parts.pop(0))
        else:
            out.write(f.encoded)


def _rewrite_graph(graph: memoryview, counter: list[int], *, top: bool) -> list[bytes]:
    """The graph's fields as encoded parts, with the rewrites applied."""
    nodes = [_Node.parse(f.payload) for f in _fields(graph) if f.number == _GRAPH_NODE]
    tensors = {
        t.name: t
        for t in (
            _Tensor.parse(f.payload) for f in _fields(graph) if f.number == _GRAPH_INITIALIZER
        )
    }
    chains = _dequantisation_chains(nodes, tensors) if top else []
    dropped = {id(node) for chain in chains for node in chain[:3]}
    kept = [n for n in nodes if id(n) not in dropped]
    outputs = {  # ValueInfoProto: the name is field 1
        name for f in _fields(graph) if f.number == _GRAPH_OUTPUT for name in _strings(f.payload, 1)
    }
    needed = _referenced_names(kept) | outputs
    parts: list[bytes] = []
    named = False
    for f in _fields(graph):
        if f.number == _GRAPH_NODE:
            continue
        if f.number == _GRAPH_INITIALIZER and _Tensor.parse(f.payload).name not in needed:
            continue  # only the int8 weights, scales and offsets of folded chains
        named |= f.number == _GRAPH_NAME and len(f.payload) > 0
        parts.append(bytes(f.encoded))
    parts += [_len_field(_GRAPH_NODE, _rewrite_node(node.encoded, counter)) for node in kept]
    for cast, mul, add in chains:
        weights = _dequantise(tensors, cast, mul, add)
        parts.append(_len_field(_GRAPH_INITIALIZER, _float_tensor(add.outputs[0], weights)))
    log.debug("folded %d dequantised weights", len(chains))
    if not top and not named:
        counter[0] += 1
        parts.append(_len_field(_GRAPH_NAME, f"subgraph_{counter[0]}".encode()))
    return parts


def _referenced_names(nodes: list[_Node]) -> set[str]:
    """Every tensor name the nodes read, including from inside their subgraphs."""
    names = {name for node in nodes for name in node.inputs}
    for node in nodes:
        if node.op_type in ("If", "Loop", "Scan"):
            names |= _subgraph_inputs(node.encoded)
    return names


def _subgraph_inputs(node: memoryview) -> set[str]:
    names: set[str] = set()
    for f in _fields(node):
        if f.number != _NODE_ATTRIBUTE:
            continue
        for a in _fields(f.payload):
            if a.number in (_ATTR_G, _ATTR_GRAPHS):
                inner = [
                    _Node.parse(g.payload) for g in _fields(a.payload) if g.number == _GRAPH_NODE
                ]
                names |= _referenced_names(inner)
    return names


def _rewrite_node(node: memoryview, counter: list[int]) -> bytes:
    out = bytearray()
    for f in _fields(node):
        if f.number != _NODE_ATTRIBUTE:
            out += f.encoded
            continue
        attr = bytearray()
        for a in _fields(f.payload):
            if a.number in (_ATTR_G, _ATTR_GRAPHS):
                attr += _len_field(
                    a.number, b"".join(_rewrite_graph(a.payload, counter, top=False))
                )
            else:
                attr += a.encoded
        out += _len_field(_NODE_ATTRIBUTE, bytes(attr))
    return bytes(out)


def _dequantisation_chains(
    nodes: list[_Node], tensors: dict[str, _Tensor]
) -> list[tuple[_Node, _Node, _Node]]:
    """Cast(int weight) -> Mul(float scale) -> Add(float offset) chains on constants."""
    consumers: dict[str, list[_Node]] = {}
    for node in nodes:
        for name in node.inputs:
            consumers.setdefault(name, []).append(node)
    chains = []
    for cast in nodes:
        if cast.op_type != "Cast" or cast.int_attribute("to") != _FLOAT:
            continue
        weights = _constant(tensors, cast.inputs[0])
        mul = _only_consumer(consumers, cast.outputs[0], "Mul")
        add = _only_consumer(consumers, mul.outputs[0], "Add") if mul else None
        if weights is None or weights.dtype == np.float32 or mul is None or add is None:
            continue
        if _other_constant(tensors, mul, cast.outputs[0]) is None:
            continue
        if _other_constant(tensors, add, mul.outputs[0]) is not None:
            chains.append((cast, mul, add))
    return chains


def _dequantise(tensors: dict[str, _Tensor], cast: _Node, mul: _Node, add: _Node) -> np.ndarray:
    """What the chain computes, in float32 as ONNX Runtime would."""
    weights = _constant(tensors, cast.inputs[0])
    scale = _other_constant(tensors, mul, cast.outputs[0])
    offset = _other_constant(tensors, add, mul.outputs[0])
    assert weights is not None and scale is not None and offset is not None
    result = weights.astype(np.float32)
    result *= scale
    result += offset
    return result


def _constant(tensors: dict[str, _Tensor], name: str) -> np.ndarray | None:
    tensor = tensors.get(name)
    return tensor.array() if tensor is not None else None


def _only_consumer(consumers: dict[str, list[_Node]], name: str, op_type: str) -> _Node | None:
    found = consumers.get(name, [])
    return found[0] if len(found) == 1 and found[0].op_type == op_type else None


def _other_constant(tensors: dict[str, _Tensor], node: _Node, this: str) -> np.ndarray | None:
    others = [name for name in node.inputs if name != this]
    if len(others) != 1:
        return None
    value = _constant(tensors, others[0])
    return value if value is not None and value.dtype == np.float32 else None

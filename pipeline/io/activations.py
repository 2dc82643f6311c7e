"""The activation file format that stage 1 writes and stage 2 reads: Arrow IPC stream files.

    from pipeline.io.activations import write_activations, read_activations
    write_activations(path, ids, vectors, n_tokens, metadata={"layer": "20"}, errors={3: "why"})
    ids, vectors, n_tokens, metadata, row_errors = read_activations(path)   # vectors: np.float32 [N, d_model]

Columns: ``id`` (string), ``activation`` (fixed_size_list<float32|float16>[d_model]), ``n_tokens``
(int32), ``error`` (string: null, or why extract could not run the row; that row's ``activation``
is null). The stream format is what ``datasets.Dataset.from_file`` memory-maps, and pyarrow reads
it with ``pa.ipc.open_stream``. Files without an ``error`` column (older ones, other tools) read too.
"""
from __future__ import annotations

import numpy as np
import pyarrow as pa

from pipeline.errors import PipelineError

# Bumped when the columns change (2: the 'error' column); part of extract's settings fingerprint.
ACTIVATION_FORMAT = 2


def activation_schema(d_model: int, dtype: str, metadata: dict) -> pa.Schema:
    value_type = pa.float16() if dtype == "float16" else pa.float32()
    fields = [
        pa.field("id", pa.string()),
        pa.field("activation", pa.list_(value_type, d_model)),
        pa.field("n_tokens", pa.int32()),
        pa.field("error", pa.string()),
    ]
    return pa.schema(fields, metadata={k: str(v) for k, v in metadata.items()})


def write_activations(path, ids: list[str], vectors: np.ndarray, n_tokens: list[int], metadata: dict,
                      dtype: str = "float32", errors: dict[int, str] | None = None) -> None:
    """Write one file; ``vectors`` is [rows, d_model] float32 in input order. A row in ``errors``
    ({row: message}) gets a null activation (its slot holds zeros) and the message."""
    np_dtype = np.float16 if dtype == "float16" else np.float32
    d_model = vectors.shape[1]
    errors = errors or {}
    schema = activation_schema(d_model, dtype, metadata)
    values = np.ascontiguousarray(vectors, dtype=np_dtype)  # [rows, d_model]
    if errors:  # zeros in the null slots, on a copy: the caller's array is left as it is
        values = values.copy()
        values[list(errors)] = 0
    mask = pa.array([i in errors for i in range(len(ids))]) if errors else None
    activation = pa.FixedSizeListArray.from_arrays(pa.array(values.reshape(-1)), d_model, mask=mask)
    table = pa.table(
        [pa.array(ids, pa.string()), activation, pa.array(n_tokens, pa.int32()),
         pa.array([errors.get(i) for i in range(len(ids))], pa.string())],
        schema=schema,
    )
    with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_stream(sink, schema) as writer:
        writer.write_table(table)


def read_activations(path, width: int | None = None) -> tuple[list[str], np.ndarray, list[int], dict, dict[int, str]]:
    """(ids, vectors [N, d_model] float32, n_tokens, metadata, row_errors) of one activation file.

    Files from ``extract`` hold a fixed-size list column. A variable-size list (from another tool) is
    read too when ``width`` is given: rows of another length get a zero vector and an entry in
    ``row_errors`` ({row: message}), so the caller can skip them without losing the file. So does a
    row with a null activation, and a row whose ``error`` is set gets ``"extract: <error>"``.
    """
    try:
        with pa.memory_map(str(path)) as source:
            table = pa.ipc.open_stream(source).read_all()
    except (pa.ArrowInvalid, OSError) as e:
        raise PipelineError(f"{path}: not a readable activation file ({str(e).splitlines()[0]})") from e
    missing = {"id", "activation"} - set(table.column_names)
    if missing:
        raise PipelineError(f"{path}: activation file lacks column(s) {sorted(missing)}")
    act_type = table.schema.field("activation").type
    column = table.column("activation").combine_chunks()
    errors: dict[int, str] = {}
    if pa.types.is_fixed_size_list(act_type):
        # .values, not .flatten(): flatten drops the slots of null rows, which must keep their place.
        size = act_type.list_size
        flat = column.values[column.offset * size : (column.offset + len(column)) * size]
        vectors = flat.to_numpy(zero_copy_only=False).astype(np.float32, copy=False).reshape(-1, size)
        if column.null_count:
            nulls = column.is_null().to_numpy(zero_copy_only=False)
            vectors = np.where(nulls[:, None], np.float32(0), vectors)
            errors.update((int(i), "activation is null") for i in np.flatnonzero(nulls))
    elif (pa.types.is_list(act_type) or pa.types.is_large_list(act_type)) and width is not None:
        vectors = np.zeros((len(column), width), dtype=np.float32)
        for i, row in enumerate(column.to_pylist()):
            if row is None or len(row) != width:
                errors[i] = f"activation has width {0 if row is None else len(row)}, the model's d_model is {width}"
            else:
                vectors[i] = row
    else:
        raise PipelineError(f"{path}: column 'activation' is {act_type}, expected a fixed-size list of floats")
    if "error" in table.column_names:
        errors.update((i, f"extract: {e}") for i, e in enumerate(table.column("error").to_pylist()) if e is not None)
    meta = {k.decode(): v.decode() for k, v in (table.schema.metadata or {}).items()}
    n_tokens = table.column("n_tokens").to_pylist() if "n_tokens" in table.column_names else [0] * len(vectors)
    return table.column("id").to_pylist(), vectors, n_tokens, meta, errors


def count_rows(path) -> int:
    """Rows in an activation file, from its record-batch headers (memory-mapped: no data is read).
    Raises on a file that is not a complete Arrow IPC stream, e.g. one cut short by a crash."""
    with pa.memory_map(str(path)) as source:
        return sum(batch.num_rows for batch in pa.ipc.open_stream(source))

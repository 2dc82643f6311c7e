"""The activation file format that stage 1 writes and stage 2 reads: Arrow IPC stream files.

    from pipeline.io.activations import ActivationWriter, write_activations, read_activations, read_row_keys
    write_activations(path, ids, vectors, n_tokens, metadata={"layer": "20"}, errors={3: "why"})
    with ActivationWriter(path, d_model=3584, metadata={...}) as w:     # record batch by record batch
        w.write(ids, vectors, n_tokens, positions=[811, ...], token_ids=[198, ...], errors={})
    ids, vectors, n_tokens, metadata, row_errors = read_activations(path)   # vectors: np.float32 [N, d_model]
    read_row_keys(path)     # {"position": [...], "token_id": [...]}: what later stages carry (None if absent)

Columns: ``id`` (string), ``position`` (int32: the index read in the row's token sequence),
``token_id`` (int32: the token there), ``activation`` (fixed_size_list<float32|float16>[d_model]),
``n_tokens`` (int32: the row's length), ``error`` (string: null, or why extract could not run the row;
that row's ``activation``, ``position`` and ``token_id`` are null). One row per (input row, position):
``id`` + ``position`` is the key. The stream format is what ``datasets.Dataset.from_file``
memory-maps, and pyarrow reads it with ``pa.ipc.open_stream``. Files without the ``error``,
``position`` or ``token_id`` columns (older ones, other tools) read too.

Since one input row can give many output rows (``extract.positions=all``), the schema metadata's
``input_rows`` says how many input rows a file covers: that is what the driver checks a finished
chunk against (``count_input_rows``).
"""
from __future__ import annotations

import numpy as np
import pyarrow as pa

from pipeline.errors import PipelineError

# Bumped when the columns change (2: the 'error' column; 3: 'position' and 'token_id');
# part of extract's settings fingerprint.
ACTIVATION_FORMAT = 3


def activation_schema(d_model: int, dtype: str, metadata: dict) -> pa.Schema:
    value_type = pa.float16() if dtype == "float16" else pa.float32()
    fields = [
        pa.field("id", pa.string()),
        pa.field("position", pa.int32()),
        pa.field("token_id", pa.int32()),
        pa.field("activation", pa.list_(value_type, d_model)),
        pa.field("n_tokens", pa.int32()),
        pa.field("error", pa.string()),
    ]
    return pa.schema(fields, metadata={k: str(v) for k, v in metadata.items()})


class ActivationWriter:
    """Writes one activation file a record batch at a time, so a chunk whose rows give many vectors
    never needs all of them in memory. The file is complete (readable) only once closed."""

    def __init__(self, path, d_model: int, metadata: dict, dtype: str = "float32"):
        self.d_model, self.np_dtype = d_model, np.float16 if dtype == "float16" else np.float32
        self.schema = activation_schema(d_model, dtype, metadata)
        self._sink = pa.OSFile(str(path), "wb")
        self._writer = pa.ipc.new_stream(self._sink, self.schema)
        self.rows = 0

    def write(self, ids: list[str], vectors: np.ndarray, n_tokens: list[int], positions: list | None = None,
              token_ids: list | None = None, errors: dict[int, str] | None = None) -> None:
        """Append rows; ``vectors`` [rows, d_model]. A row in ``errors`` ({row: message}) gets a null
        activation (its slot holds zeros), position and token id."""
        errors = errors or {}
        n = len(ids)
        values = np.ascontiguousarray(vectors, dtype=self.np_dtype).reshape(n, self.d_model)
        if errors:  # zeros in the null slots, on a copy: the caller's array is left as it is
            values = values.copy()
            values[list(errors)] = 0
        mask = pa.array([i in errors for i in range(n)]) if errors else None
        activation = pa.FixedSizeListArray.from_arrays(pa.array(values.reshape(-1)), self.d_model, mask=mask)

        def keyed(column):
            column = column if column is not None else [None] * n
            return pa.array([None if i in errors else column[i] for i in range(n)], pa.int32())

        batch = pa.record_batch(
            [pa.array(ids, pa.string()), keyed(positions), keyed(token_ids), activation,
             pa.array(n_tokens, pa.int32()), pa.array([errors.get(i) for i in range(n)], pa.string())],
            schema=self.schema,
        )
        self._writer.write_batch(batch)
        self.rows += n

    def close(self) -> None:
        self._writer.close()
        self._sink.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def write_activations(path, ids: list[str], vectors: np.ndarray, n_tokens: list[int], metadata: dict,
                      dtype: str = "float32", errors: dict[int, str] | None = None,
                      positions: list | None = None, token_ids: list | None = None) -> None:
    """Write one file in one record batch; ``vectors`` is [rows, d_model] float32 in input order."""
    with ActivationWriter(path, vectors.shape[1], metadata, dtype) as writer:
        writer.write(ids, vectors, n_tokens, positions, token_ids, errors)


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


def read_row_keys(path) -> dict[str, list | None]:
    """The ``position`` and ``token_id`` columns of an activation file (None for a column it lacks):
    verbalize and score carry them into their outputs, beside ``id``."""
    with pa.memory_map(str(path)) as source:
        table = pa.ipc.open_stream(source).read_all()
    return {k: table.column(k).to_pylist() if k in table.column_names else None for k in ("position", "token_id")}


def count_input_rows(path) -> int:
    """The input rows an activation file covers: its ``input_rows`` metadata (one input row may give
    many output rows), else its row count. Reads every batch header, so a stream cut short raises."""
    with pa.memory_map(str(path)) as source:
        reader = pa.ipc.open_stream(source)
        rows = sum(batch.num_rows for batch in reader)
        meta = reader.schema.metadata or {}
    return int(meta[b"input_rows"]) if b"input_rows" in meta else rows


def count_rows(path) -> int:
    """Rows in an activation file, from its record-batch headers (memory-mapped: no data is read).
    Raises on a file that is not a complete Arrow IPC stream, e.g. one cut short by a crash."""
    with pa.memory_map(str(path)) as source:
        return sum(batch.num_rows for batch in pa.ipc.open_stream(source))

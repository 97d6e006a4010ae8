"""The `tensorgate` command: `serve` (the server's own CLI) and the client commands.

    tensorgate serve --repository examples/models          # needs the server: pip install tensorgate
    tensorgate build-engine model.onnx --max-batch 64      # a TensorRT plan: pip install 'tensorgate[tensorrt]'
    tensorgate models
    tensorgate metadata digits
    tensorgate predict digits --input image=images.npy --save out/
    tensorgate predict add_sub --json - <<< '{"a": [[1, 2, 3, 4]], "b": [[4, 3, 2, 1]]}'
    tensorgate health
    tensorgate load digits --token-file token              # load or reload from the server's repository
    tensorgate unload digits --token-file token
    tensorgate repository                                  # the repository index: versions, states, reasons
    tensorgate stream --model digits --source synthetic --fps 30 --duration 10

Exit status: 0 on success; 1 when the server reports an error (printed as `error: CODE: details`) or, for
`health`, when the status is not SERVING; 2 for a usage error or bad local input (a missing file, bad JSON).
The server's address comes from --address, else $TENSORGATE_ADDRESS, else 127.0.0.1:8001.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import re
import sys
import textwrap
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, cast

import numpy as np
import numpy.typing as npt

from tensorgate.client import stream_tool
from tensorgate.client._common import ModelInfo, ModelMetadata, RepositoryEntry
from tensorgate.client._sync import Client
from tensorgate.client.errors import TensorgateClientError
from tensorgate.client.tensors import TensorFormatError, dtype_from_name, dtype_name

__all__ = [
    "DEFAULT_ADDRESS",
    "InputError",
    "build_parser",
    "format_load",
    "format_metadata",
    "format_models",
    "format_outputs",
    "format_repository",
    "json_inputs",
    "main",
    "npy_inputs",
    "positive_int",
    "save_outputs",
]

DEFAULT_ADDRESS = "127.0.0.1:8001"
DEFAULT_TIMEOUT = 30.0
#: Loading a model includes reading, compiling and warming it up; a deadline cut short would abandon the load.
DEFAULT_LOAD_TIMEOUT = 300.0
_JSON_KEYS = frozenset({"dtype", "data", "shape"})


class InputError(Exception):
    """Bad local input (a file that cannot be read, JSON that does not describe tensors): exit status 2."""


# Parsing ----------------------------------------------------------------------------------------------------


def _input_spec(value: str) -> tuple[str, Path]:
    name, sep, path = value.partition("=")
    if not sep or not name or not path:
        raise argparse.ArgumentTypeError(f"expected NAME=FILE.npy, got {value!r}")
    return name, Path(path)


def positive_int(value: str) -> int:
    """An argparse `type` for counts: a whole number of at least 1, else a usage error naming the value."""
    try:
        number = int(value)
    except ValueError:
        number = 0
    if number < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value!r}")
    return number


def _positive_float(value: str) -> float:
    try:
        number = float(value)
    except ValueError:
        number = 0.0
    if not number > 0:
        raise argparse.ArgumentTypeError(f"expected a positive number of seconds, got {value!r}")
    return number


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of every command except `serve`, which the server's own CLI parses."""
    connection = argparse.ArgumentParser(add_help=False)
    group = connection.add_argument_group("connection")
    group.add_argument(
        "--address",
        default=os.environ.get("TENSORGATE_ADDRESS", DEFAULT_ADDRESS),
        help="the server's HOST:PORT (default: $TENSORGATE_ADDRESS, else %(default)s)",
    )
    group.add_argument(
        "--timeout",
        type=_positive_float,
        metavar="SECONDS",
        help=f"deadline of each call (default: {DEFAULT_TIMEOUT:g}; load and unload: {DEFAULT_LOAD_TIMEOUT:g})",
    )
    group.add_argument("--tls", action="store_true", help="use TLS (implied by the certificate options)")
    # Defaults from the environment, like --address; a flag given wins.
    group.add_argument(
        "--tls-ca",
        type=Path,
        default=os.environ.get("TENSORGATE_TLS_CA") or None,
        metavar="PEM",
        help="CA certificates to trust (default: $TENSORGATE_TLS_CA)",
    )
    group.add_argument(
        "--tls-cert",
        type=Path,
        default=os.environ.get("TENSORGATE_CLIENT_CERT") or None,
        metavar="PEM",
        help="client certificate chain, for mutual TLS (default: $TENSORGATE_CLIENT_CERT)",
    )
    group.add_argument(
        "--tls-key",
        type=Path,
        default=os.environ.get("TENSORGATE_CLIENT_KEY") or None,
        metavar="PEM",
        help="client private key, for mutual TLS (default: $TENSORGATE_CLIENT_KEY)",
    )
    # No defaults here: either flag beats both variables (see _token).
    group.add_argument(
        "--token",
        help="bearer token sent with every call (default: $TENSORGATE_TOKEN; --token-file keeps it out of ps)",
    )
    group.add_argument(
        "--token-file",
        type=Path,
        metavar="FILE",
        help="read the bearer token from FILE (default: $TENSORGATE_TOKEN_FILE)",
    )

    parser = argparse.ArgumentParser(
        prog="tensorgate",
        description="Serve models over gRPC (serve), or call a tensorgate server.",
        epilog="Exit status: 0 ok; 1 error from the server (or not SERVING); 2 bad usage or local input.",
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    # Listed here for the help text only: main() hands `serve` and everything after it to the server's CLI.
    commands.add_parser("serve", add_help=False, help="run the server (options: tensorgate serve --help)")
    commands.add_parser(
        "build-engine", add_help=False, help="build a TensorRT plan from ONNX (options: tensorgate build-engine --help)"
    )

    predict = commands.add_parser(
        "predict",
        parents=[connection],
        help="run one request and print (or save) its outputs",
        description="Run one request. Inputs come from .npy files or from JSON: "
        '{"NAME": nested list, ...}, where a list takes the dtype of the model\'s input, or '
        '{"NAME": {"dtype": "FP32", "data": [...], "shape": [...]}} (shape optional).',
    )
    predict.add_argument("model", help="the model's name")
    source = predict.add_mutually_exclusive_group(required=True)
    source.add_argument(
        "--input",
        "-i",
        dest="inputs",
        action="append",
        type=_input_spec,
        metavar="NAME=FILE.npy",
        help="an input from a .npy file (repeat for each input)",
    )
    source.add_argument("--json", dest="json_file", metavar="FILE", help="the inputs as JSON; - reads stdin")
    predict.add_argument("--version", type=positive_int, help="model version (default: the server's)")
    predict.add_argument(
        "--output", "-o", dest="outputs", action="append", metavar="NAME", help="return only this output"
    )
    predict.add_argument("--save", type=Path, metavar="DIR", help="write each output to DIR/NAME.npy")
    predict.set_defaults(run=_run_predict)

    models = commands.add_parser("models", parents=[connection], help="list models and their versions")
    models.set_defaults(run=_run_models)

    metadata = commands.add_parser("metadata", parents=[connection], help="show a model's inputs and outputs")
    metadata.add_argument("model", help="the model's name")
    metadata.add_argument("--version", type=positive_int, help="model version (default: the server's)")
    metadata.set_defaults(run=_run_metadata)

    health = commands.add_parser("health", parents=[connection], help="gRPC health status; exit 0 only if SERVING")
    health.add_argument("service", nargs="?", default="", help="a service name (default: the whole server)")
    health.set_defaults(run=_run_health)

    load = commands.add_parser(
        "load",
        parents=[connection],
        help="load or reload a model from the server's repository (needs the server's token or an admin identity)",
    )
    load.add_argument("model", help="the model's name: its directory in the server's repository")
    load.set_defaults(run=_run_load)

    unload = commands.add_parser(
        "unload", parents=[connection], help="stop serving a model (needs the server's token or an admin identity)"
    )
    unload.add_argument("model", help="the model's name")
    unload.set_defaults(run=_run_unload)

    repository = commands.add_parser(
        "repository", parents=[connection], help="list the repository index: model versions, states, reasons"
    )
    repository.add_argument("--ready", action="store_true", help="only the versions that serve")
    repository.set_defaults(run=_run_repository)

    stream_tool.add_parser(commands, connection, _client)
    return parser


# Inputs -----------------------------------------------------------------------------------------------------


def npy_inputs(specs: Sequence[tuple[str, Path]]) -> dict[str, npt.NDArray[Any]]:
    """Load `--input NAME=FILE.npy` arguments (no pickles: object arrays are refused)."""
    inputs: dict[str, npt.NDArray[Any]] = {}
    for name, path in specs:
        if name in inputs:
            raise InputError(f"input {name!r} is given twice")
        try:
            loaded = np.load(path, allow_pickle=False)
        except (OSError, ValueError) as exc:
            raise InputError(f"cannot read input {name!r} from {path}: {exc}") from None
        if not isinstance(loaded, np.ndarray):  # an .npz archive
            raise InputError(f"input {name!r}: {path} holds several arrays; give a .npy file of one array")
        inputs[name] = loaded
    return inputs


def _json_array(name: str, data: object, dtype_label: str, shape: object) -> npt.NDArray[Any]:
    try:
        dtype = dtype_from_name(dtype_label)
    except TensorFormatError as exc:
        raise InputError(f"input {name!r}: {exc}") from None
    try:
        given = np.asarray(data)
        if dtype_label != "BYTES" and given.dtype.kind in "USO":
            raise InputError(f"input {name!r}: {dtype_label} needs numbers, not strings")
        if dtype.kind in "iub" and given.dtype.kind == "f" and not np.array_equal(given, np.trunc(given)):
            raise InputError(f"input {name!r}: {dtype_label} needs whole numbers")
        array = np.asarray(data, dtype=dtype)
        if shape is not None:
            if not isinstance(shape, list) or not all(type(dim) is int for dim in shape):
                raise InputError(f'input {name!r}: "shape" must be a list of integers')
            array = array.reshape(shape)
    except (ValueError, TypeError, OverflowError) as exc:
        raise InputError(f"input {name!r}: cannot make a {dtype_label} array: {exc}") from None
    return array


def json_inputs(text: str, input_dtypes: Callable[[], Mapping[str, str]]) -> dict[str, npt.NDArray[Any]]:
    """Parse `--json` inputs.

    Each input is a nested list, which takes the dtype of the model's input of that name (`input_dtypes` is
    called once, only if some input needs it), or an object {"dtype": "FP32", "data": [...], "shape": [...]}
    with "shape" optional (it reshapes flat "data").
    """
    try:
        document = json.loads(text)
    except json.JSONDecodeError as exc:
        raise InputError(f"bad JSON: {exc}") from None
    if not isinstance(document, dict) or not document:
        raise InputError('JSON inputs must be an object of input name to array, e.g. {"x": [[1, 2]]}')
    dtypes: Mapping[str, str] | None = None
    inputs: dict[str, npt.NDArray[Any]] = {}
    for name, value in document.items():
        shape: object = None
        label: object = None
        data: object = value
        if isinstance(value, dict):
            unknown = sorted(set(value) - _JSON_KEYS)
            if unknown or "data" not in value:
                raise InputError(
                    f"input {name!r}: expected the keys dtype, data and shape (dtype and shape optional); "
                    f"got {sorted(value)}"
                )
            data, label, shape = value["data"], value.get("dtype"), value.get("shape")
        if label is None:
            if dtypes is None:
                dtypes = input_dtypes()
            if name not in dtypes:
                known = ", ".join(dtypes) or "none"
                raise InputError(f'the model has no input {name!r} (its inputs: {known}); give its "dtype"')
            label = dtypes[name]
        if not isinstance(label, str):
            raise InputError(f'input {name!r}: "dtype" must be a string such as "FP32"')
        inputs[name] = _json_array(name, data, label, shape)
    return inputs


def _read_text(path: str) -> str:
    if path == "-":
        return sys.stdin.read()
    try:
        return Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(f"cannot read {path}: {exc}") from None


# Output -----------------------------------------------------------------------------------------------------


def format_outputs(outputs: Mapping[str, npt.NDArray[Any]]) -> str:
    """Outputs as text: a "name: DTYPE [shape]" line each, then the values, long arrays summarised."""
    blocks = []
    with np.printoptions(threshold=200, edgeitems=4, precision=5, suppress=True, linewidth=108):
        for name, array in outputs.items():
            values = textwrap.indent(np.array2string(array, separator=", "), "  ")
            blocks.append(f"{name}: {dtype_name(array.dtype)} {list(array.shape)}\n{values}")
    return "\n".join(blocks)


def save_outputs(outputs: Mapping[str, npt.NDArray[Any]], directory: Path) -> None:
    """Write each output to DIRECTORY/NAME.npy (BYTES as fixed-width bytes) and print what went where."""
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise InputError(f"cannot create {directory}: {exc}") from None
    for name, array in outputs.items():
        # Output names come from the server; keep them inside `directory`.
        path = directory / ((re.sub(r"[^\w.-]", "_", name).lstrip(".") or "_") + ".npy")
        # BYTES arrays hold Python bytes objects, which np.save could only pickle.
        savable = array.astype(np.bytes_) if array.dtype == np.object_ else array
        try:
            np.save(path, savable, allow_pickle=False)
        except OSError as exc:
            raise InputError(f"cannot write {path}: {exc}") from None
        print(f"{name}: {dtype_name(array.dtype)} {list(array.shape)} -> {path}")


def _table(rows: Sequence[Sequence[str]]) -> str:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)) for row in rows)
    return "\n".join(line.rstrip() for line in lines)


def format_models(models: Sequence[ModelInfo]) -> str:
    """The `models` table: one row per model version (a model without versions gets one row)."""
    rows = [("MODEL", "VERSION", "STATE", "PLATFORM", "REASON")]
    for model in models:
        if not model.versions:
            rows.append((model.name, "-", "-", model.platform, model.reason))
        for version in model.versions:
            reason = "; ".join(r for r in (model.reason, version.reason) if r)
            rows.append((model.name, str(version.version), version.state, model.platform, reason))
    return _table(rows)


def _one_line(text: str) -> str:
    return " ".join(text.split())


def format_repository(entries: Sequence[RepositoryEntry]) -> str:
    """The `repository` table: one row per index entry ("-" for the version of a model without one)."""
    rows = [("MODEL", "VERSION", "STATE", "REASON")]
    for entry in entries:
        version = "-" if entry.version is None else str(entry.version)
        rows.append((entry.name, version, entry.state, _one_line(entry.reason)))
    return _table(rows)


def format_load(model: str, entries: Sequence[RepositoryEntry]) -> str:
    """The `load` line, e.g. "loaded digits: version 1 ready", then any version that did not (re)load."""
    ready = [str(entry.version) for entry in entries if entry.ready and entry.version is not None]
    parts = []
    if ready:
        parts.append(f"{'versions' if len(ready) > 1 else 'version'} {', '.join(ready)} ready")
    for entry in entries:
        if entry.ready and not entry.reason:
            continue
        # A version that failed, or one still serving its previous load because its reload failed.
        label = "model" if entry.version is None else f"version {entry.version}"
        state = "" if entry.ready else f" {entry.state}"
        reason = f" ({_one_line(entry.reason)})" if entry.reason else ""
        parts.append(f"{label}{state}{reason}")
    return f"loaded {model}" + (f": {'; '.join(parts)}" if parts else "")


def format_metadata(meta: ModelMetadata) -> str:
    """The `metadata` text: the model's identity, then its inputs and outputs."""
    lines = [
        f"model:          {meta.name}",
        f"version:        {meta.version}",
        f"platform:       {meta.platform}",
        f"engine:         {meta.engine}",
        f"max batch size: {meta.max_batch_size}",
    ]
    for title, tensors in (("inputs", meta.inputs), ("outputs", meta.outputs)):
        lines.append(f"{title}:")
        rows = [(f"  {t.name}", t.dtype, str(list(t.shape))) for t in tensors]
        if rows:
            lines.append(_table(rows))
    return "\n".join(lines)


# Commands ---------------------------------------------------------------------------------------------------


def _token(args: argparse.Namespace) -> str | None:
    """--token, else --token-file, else $TENSORGATE_TOKEN, else $TENSORGATE_TOKEN_FILE; None: no token."""
    token: str | None = args.token
    path: Path | None = args.token_file
    if token is not None and path is not None:
        raise InputError("give --token or --token-file, not both")
    if token is None and path is None:
        token = os.environ.get("TENSORGATE_TOKEN") or None
        if token is None and os.environ.get("TENSORGATE_TOKEN_FILE"):
            path = Path(os.environ["TENSORGATE_TOKEN_FILE"])
    if path is not None:
        try:
            token = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise InputError(f"cannot read the token from {path}: {exc}") from None
    return token


def _client(args: argparse.Namespace) -> Client:
    try:
        return Client(
            args.address,
            tls=args.tls,
            root_certificates=args.tls_ca,
            private_key=args.tls_key,
            certificate_chain=args.tls_cert,
            timeout=DEFAULT_TIMEOUT if args.timeout is None else args.timeout,
            token=_token(args),
        )
    except (OSError, ValueError) as exc:  # an unreadable certificate file, an incomplete mutual TLS pair
        raise InputError(str(exc)) from None


def _run_predict(args: argparse.Namespace) -> int:
    # Local input is read before connecting, so that a bad file fails fast and the same way offline.
    npy = npy_inputs(args.inputs) if args.inputs else None
    text = _read_text(args.json_file) if npy is None else ""
    with _client(args) as client:

        def input_dtypes() -> dict[str, str]:
            meta = client.metadata(args.model, version=args.version)
            return {info.name: info.dtype for info in meta.inputs}

        inputs = npy if npy is not None else json_inputs(text, input_dtypes)
        outputs = client.predict(args.model, inputs, version=args.version, outputs=args.outputs)
    if args.save is not None:
        save_outputs(outputs, args.save)
    else:
        print(format_outputs(outputs))
    return 0


def _run_models(args: argparse.Namespace) -> int:
    with _client(args) as client:
        print(format_models(client.models()))
    return 0


def _run_metadata(args: argparse.Namespace) -> int:
    with _client(args) as client:
        print(format_metadata(client.metadata(args.model, version=args.version)))
    return 0


def _run_health(args: argparse.Namespace) -> int:
    with _client(args) as client:
        status = client.health(args.service)
    print(status)
    return 0 if status == "SERVING" else 1


def _load_timeout(args: argparse.Namespace) -> float:
    timeout: float = DEFAULT_LOAD_TIMEOUT if args.timeout is None else args.timeout
    return timeout


def _run_load(args: argparse.Namespace) -> int:
    with _client(args) as client:
        entries = client.load(args.model, timeout=_load_timeout(args))
    print(format_load(args.model, entries))
    return 0


def _run_unload(args: argparse.Namespace) -> int:
    with _client(args) as client:
        client.unload(args.model, timeout=_load_timeout(args))
    print(f"unloaded {args.model}")
    return 0


def _run_repository(args: argparse.Namespace) -> int:
    with _client(args) as client:
        print(format_repository(client.repository(ready=args.ready)))
    return 0


def _serve(argv: Sequence[str], module_name: str = "tensorgate.server.cli") -> int:
    # Imported by name: the server is another distribution, which a client-only install (and a type check of
    # the client alone) does not have.
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name not in {"tensorgate", "tensorgate.server", module_name}:
            raise  # the server is there but one of its own dependencies is not: show that
        print("error: the server is not installed: pip install tensorgate", file=sys.stderr)
        return 2
    serve_main = cast(Callable[[Sequence[str]], int], module.main)
    return serve_main(argv)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the `tensorgate` command with `argv` (default: `sys.argv[1:]`) and return its exit status."""
    arguments = list(sys.argv[1:] if argv is None else argv)
    try:
        if arguments[:1] == ["serve"]:
            return _serve(arguments[1:])
        if arguments[:1] == ["build-engine"]:  # server-side too: it needs the engines (and TensorRT)
            return _serve(arguments[1:], "tensorgate.server.build_engine")
        parser = build_parser()
        args = parser.parse_args(arguments)
        if args.command is None:
            parser.print_help(sys.stderr)
            return 2
        run = cast(Callable[[argparse.Namespace], int], args.run)
        return run(args)
    except SystemExit as exc:  # argparse's --help and usage errors: return the status instead of exiting
        if isinstance(exc.code, str):
            print(exc.code, file=sys.stderr)
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    except TensorgateClientError as exc:
        print(f"error: {exc.code.name}: {exc.details}", file=sys.stderr)
        return 1
    except (InputError, TensorFormatError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130

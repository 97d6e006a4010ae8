"""Build the bundled example models in examples/models/.

* ``digits``: a real image classifier, trained here on scikit-learn's bundled 8x8 handwritten digits (nothing
  is downloaded), exported to ONNX by hand with ``onnx.helper``. It ships with a ``config.pbtxt``.
* ``add_sub``: a two-input, two-output arithmetic model shipped *without* a ``config.pbtxt``, to show the
  server deriving a configuration from the ONNX graph.

Run ``.venv/bin/python examples/build_digits.py``. Training and export are deterministic (fixed seeds, fixed
split), so rebuilding on the same machine rewrites the same bytes.

Tests import this file by path (``examples/`` is not a package) for :func:`held_out_digits`, so importing it
must stay cheap and side-effect free: scikit-learn (over a second to import) is needed only by :func:`main`.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import sys
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import onnx
from onnx import TensorProto, helper, numpy_helper

# Fixed so that the split, the training and therefore the committed model bytes are reproducible.
SEED = 0
TEST_SIZE = 0.25
HIDDEN_UNITS = 64
# sklearn's digits pixels are integers 0..16; the model divides by this so clients send raw pixels.
PIXEL_MAX = 16.0
NUM_CLASSES = 10

# onnxruntime 1.31 reads IR versions up to 13 while onnx 1.23 writes 14 by default: pin an IR version every
# supported runtime reads, with the matching default-domain opset.
IR_VERSION = 9
OPSET = 17

# Key of the ONNX metadata entry recording the held-out accuracy measured at build time, so tests can check
# the committed model against the figure the build reported without retraining.
ACCURACY_KEY = "held_out_accuracy"

MODELS_DIR = Path(__file__).resolve().parent / "models"

DIGITS_CONFIG = """\
# The bundled digits classifier: an MLP trained by examples/build_digits.py on scikit-learn's 8x8 digits.
name: "digits"
platform: "onnxruntime_onnx"
max_batch_size: 64
input [
  {
    # Raw pixel intensities 0..16 as scikit-learn gives them; the model scales them itself.
    name: "image"
    data_type: TYPE_FP32
    dims: [ 1, 8, 8 ]
  }
]
output [
  {
    name: "probabilities"
    data_type: TYPE_FP32
    dims: [ 10 ]
  },
  {
    # One class index per image: the tensor is [batch], so without the batch dimension it has no dims.
    name: "label"
    data_type: TYPE_INT64
    dims: [ ]
  }
]
dynamic_batching {
  preferred_batch_size: [ 16, 32 ]
  max_queue_delay_microseconds: 500
}
instance_group [
  {
    count: 2
    kind: KIND_CPU
  }
]
parameters [
  {
    # A tiny model: ONNX Runtime's pool threads would spin between runs on CPU the event loop needs.
    key: "allow_spinning"
    value: { string_value: "0" }
  }
]
"""

FloatArray = npt.NDArray[np.float32]
IntArray = npt.NDArray[np.int64]


def _digits_csv() -> Path | None:
    """Where scikit-learn keeps its bundled digits data, found without importing scikit-learn."""
    # find_spec on a top-level package locates it without executing it: `import sklearn` costs over a
    # second (scipy), which would dominate the unit tests that only need the held-out images.
    spec = importlib.util.find_spec("sklearn")
    for location in (spec.submodule_search_locations or []) if spec else []:
        candidate = Path(location) / "datasets" / "data" / "digits.csv.gz"
        if candidate.is_file():
            return candidate
    return None


def load_digits_data() -> tuple[FloatArray, IntArray]:
    """All 1797 digits: images flattened to float32 [N, 64] (pixels 0..16) and int64 labels [N].

    Reads the file behind ``sklearn.datasets.load_digits`` directly (see :func:`_digits_csv`); falls back to
    calling it if a future scikit-learn moves the file. :func:`main` checks both give the same data.
    """
    path = _digits_csv()
    if path is None:
        from sklearn.datasets import load_digits

        images, labels = load_digits(return_X_y=True)
        return images.astype(np.float32), labels.astype(np.int64)
    table = np.loadtxt(path, delimiter=",", dtype=np.float32)
    return np.ascontiguousarray(table[:, :-1]), table[:, -1].astype(np.int64)


def _split() -> tuple[FloatArray, FloatArray, IntArray, IntArray]:
    """Return (train images, test images, train labels, test labels), images flattened to [N, 64].

    A stratified split: each class contributes TEST_SIZE of its samples, drawn by a seeded permutation. It is
    our own (a dozen lines of numpy) rather than sklearn's train_test_split so that the split, and therefore
    the committed model's recorded held-out accuracy, cannot change with the scikit-learn version.
    """
    images, labels = load_digits_data()
    rng = np.random.default_rng(SEED)
    test_mask = np.zeros(len(labels), dtype=bool)
    for digit in range(NUM_CLASSES):
        members = np.flatnonzero(labels == digit)
        test_mask[rng.permutation(members)[: round(len(members) * TEST_SIZE)]] = True
    return images[~test_mask], images[test_mask], labels[~test_mask], labels[test_mask]


def held_out_digits() -> tuple[FloatArray, IntArray]:
    """The test split the bundled model never saw in training.

    Returns images as float32 ``[N, 1, 8, 8]`` with raw pixel values 0..16 (the model's input layout) and
    int64 labels ``[N]``.
    """
    _, x_test, _, y_test = _split()
    return x_test.reshape(-1, 1, 8, 8), y_test


def train_digits() -> Any:
    """Train the classifier on the training split; returns the fitted ``MLPClassifier``."""
    from sklearn.neural_network import MLPClassifier

    x_train, _, y_train, _ = _split()
    # adam with this seed converges (no ConvergenceWarning) in ~350 epochs, about a second on 2 cores.
    classifier = MLPClassifier(
        hidden_layer_sizes=(HIDDEN_UNITS,),
        activation="relu",
        solver="adam",
        max_iter=1000,
        random_state=SEED,
    )
    classifier.fit(x_train / PIXEL_MAX, y_train)
    return classifier


def _model(graph: onnx.GraphProto, doc: str, metadata: dict[str, str] | None = None) -> onnx.ModelProto:
    """Wrap a graph in a model pinned to IR_VERSION / OPSET, checked by the ONNX checker."""
    model = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", OPSET)],
        producer_name="tensorgate-examples",
        producer_version="1",
        doc_string=doc,
    )
    model.ir_version = IR_VERSION
    for key, value in (metadata or {}).items():
        entry = model.metadata_props.add()
        entry.key, entry.value = key, value
    onnx.checker.check_model(model, full_check=True)
    return model


def digits_model(classifier: Any, accuracy: float) -> onnx.ModelProto:
    """Export a fitted one-hidden-layer ``MLPClassifier`` as image -> (probabilities, label).

    Graph: Flatten -> Div(16) -> Gemm -> Relu -> Gemm -> {Softmax -> probabilities, ArgMax -> label}.
    ArgMax reads the logits rather than the probabilities: same answer, and it need not wait for Softmax.
    """
    coefs: list[npt.NDArray[np.float64]] = classifier.coefs_
    intercepts: list[npt.NDArray[np.float64]] = classifier.intercepts_
    if len(coefs) != 2 or coefs[1].shape[1] != NUM_CLASSES:
        raise ValueError(f"expected one hidden layer and {NUM_CLASSES} outputs, got {[c.shape for c in coefs]}")

    def const(name: str, array: npt.NDArray[Any]) -> TensorProto:
        return numpy_helper.from_array(np.ascontiguousarray(array, dtype=np.float32), name)

    initializers = [
        const("pixel_max", np.array(PIXEL_MAX)),
        # sklearn stores weights as [in, out], which is Gemm's B without transB.
        const("hidden.weight", coefs[0]),
        const("hidden.bias", intercepts[0]),
        const("output.weight", coefs[1]),
        const("output.bias", intercepts[1]),
    ]
    nodes = [
        helper.make_node("Flatten", ["image"], ["flat"], name="flatten", axis=1),
        helper.make_node("Div", ["flat", "pixel_max"], ["scaled"], name="scale"),
        helper.make_node("Gemm", ["scaled", "hidden.weight", "hidden.bias"], ["hidden_pre"], name="hidden"),
        helper.make_node("Relu", ["hidden_pre"], ["hidden_act"], name="relu"),
        helper.make_node("Gemm", ["hidden_act", "output.weight", "output.bias"], ["logits"], name="output"),
        helper.make_node("Softmax", ["logits"], ["probabilities"], name="softmax", axis=1),
        helper.make_node("ArgMax", ["logits"], ["label"], name="argmax", axis=1, keepdims=0),
    ]
    graph = helper.make_graph(
        nodes,
        "digits",
        inputs=[helper.make_tensor_value_info("image", TensorProto.FLOAT, ["batch", 1, 8, 8])],
        outputs=[
            helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, ["batch", NUM_CLASSES]),
            helper.make_tensor_value_info("label", TensorProto.INT64, ["batch"]),
        ],
        initializer=initializers,
    )
    return _model(
        graph,
        "8x8 handwritten digit classifier (scikit-learn digits, MLP 64-64-10); input: raw pixels 0..16",
        {ACCURACY_KEY: f"{accuracy:.6f}"},
    )


def add_sub_model() -> onnx.ModelProto:
    """a, b: FP32 [batch, 4] -> sum = a + b, difference = a - b."""
    graph = helper.make_graph(
        [
            helper.make_node("Add", ["a", "b"], ["sum"], name="add"),
            helper.make_node("Sub", ["a", "b"], ["difference"], name="sub"),
        ],
        "add_sub",
        inputs=[helper.make_tensor_value_info(n, TensorProto.FLOAT, ["batch", 4]) for n in ("a", "b")],
        outputs=[helper.make_tensor_value_info(n, TensorProto.FLOAT, ["batch", 4]) for n in ("sum", "difference")],
    )
    return _model(graph, "Element-wise sum and difference of two [batch, 4] tensors")


def onnx_accuracy(model_bytes: bytes, images: FloatArray, labels: IntArray) -> float:
    """Accuracy of an exported digits model's ``label`` output, run by onnxruntime."""
    import onnxruntime as ort

    session = ort.InferenceSession(model_bytes, providers=["CPUExecutionProvider"])
    (predicted,) = session.run(["label"], {"image": images})
    return float(np.mean(np.asarray(predicted) == labels))


def _write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    print(f"  wrote {path} ({len(data):,} bytes, sha256 {hashlib.sha256(data).hexdigest()[:16]})")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--out", type=Path, default=MODELS_DIR, help="model repository to write into")
    args = parser.parse_args(argv)
    out: Path = args.out

    from sklearn.datasets import load_digits

    # held_out_digits() reads sklearn's data file directly for speed: make sure it is what sklearn serves.
    reference_images, reference_labels = load_digits(return_X_y=True)
    all_images, all_labels = load_digits_data()
    if not (np.array_equal(all_images, reference_images) and np.array_equal(all_labels, reference_labels)):
        print("error: the digits file read directly differs from sklearn's load_digits()", file=sys.stderr)
        return 1

    classifier = train_digits()
    images, labels = held_out_digits()
    sklearn_accuracy = float(classifier.score(images.reshape(len(images), -1) / PIXEL_MAX, labels))
    model_bytes = digits_model(classifier, sklearn_accuracy).SerializeToString()
    exported_accuracy = onnx_accuracy(model_bytes, images, labels)
    print(f"digits: held-out accuracy {sklearn_accuracy:.4f} (sklearn), {exported_accuracy:.4f} (onnxruntime)")
    # float32 export of float64 weights could in principle flip a borderline prediction: refuse to ship a
    # model whose recorded accuracy is not what it actually scores.
    if exported_accuracy != sklearn_accuracy:
        print("error: the exported model disagrees with the trained one", file=sys.stderr)
        return 1

    _write(out / "digits" / "1" / "model.onnx", model_bytes)
    _write(out / "digits" / "config.pbtxt", DIGITS_CONFIG.encode())
    _write(out / "add_sub" / "1" / "model.onnx", add_sub_model().SerializeToString())
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""User annotations and a classifier on the latents that predicts every crop's class.

Annotations are the user's own labels and are stored apart from the predictions (the
feature column :data:`.store.ANNOTATION`), so a rerun of the classifier never loses them. The
classifier, a logistic regression on the latents as they are (standardising would give a
latent's noisy, low-variance directions the weight of its main ones), learns from the
annotated crops and predicts the others; annotated crops keep their annotation.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import StratifiedKFold, cross_val_predict

from .errors import InputError

CLASS = "class"  # the default column of the predicted classes
PROBABILITY = "_probability"  # suffix of the column of each crop's class probability
MIN_EXAMPLES = 2  # annotated crops a class needs for a classifier and its validation
FOLDS = 5  # cross-validation folds (fewer when a class has fewer examples)


@dataclass(frozen=True)
class Classification:
    """Every crop's class and probability, and the cross-validated accuracy per class."""

    classes: pd.Categorical  # annotated crops keep their annotation
    probability: np.ndarray  # the classifier's probability of each crop's class
    accuracy: pd.Series  # per class: share of its annotated crops predicted right out of fold
    counts: pd.Series  # annotated crops per class


def as_annotations(values: pd.Series | np.ndarray | list) -> pd.Categorical:
    """Annotations as a text categorical (missing: not annotated)."""
    series = pd.Series(values, dtype=object)
    text = series.where(series.isna(), series.astype(str).str.strip())
    return pd.Categorical(text.replace("", None))


def classify(latents: np.ndarray, annotations: pd.Categorical, seed: int = 0) -> Classification:
    """Learn the annotated crops' classes from their latents and predict every crop's.

    Needs two classes or more, each with :data:`MIN_EXAMPLES` annotated crops or more;
    accuracy is from stratified cross-validation (up to :data:`FOLDS` folds)."""
    annotations = pd.Categorical(annotations)
    if len(annotations) != len(latents):
        raise InputError(f"{len(annotations)} annotations for {len(latents)} crops")
    known = np.flatnonzero(~pd.isna(annotations))
    counts = pd.Series(annotations[known]).value_counts().sort_index()
    counts = counts[counts > 0]
    if len(counts) < 2:
        found = ", ".join(map(str, counts.index)) or "none"
        raise InputError(f"annotate crops of two classes or more to classify (found: {found})")
    few = counts[counts < MIN_EXAMPLES]
    if len(few):
        raise InputError(
            f"each class needs at least {MIN_EXAMPLES} annotated crops; "
            + ", ".join(f"{name!r} has {n}" for name, n in few.items())
        )
    x, y = np.asarray(latents, dtype=np.float64), np.asarray(annotations[known]).astype(str)
    model = LogisticRegression(max_iter=1000)
    folds = StratifiedKFold(min(FOLDS, int(counts.min())), shuffle=True, random_state=seed)
    held_out = cross_val_predict(model, x[known], y, cv=folds)
    accuracy = pd.Series(y == held_out).groupby(y).mean()
    model.fit(x[known], y)
    probabilities = model.predict_proba(x)
    names = model.classes_
    predicted = names[probabilities.argmax(axis=1)].astype(object)
    predicted[known] = y
    column = np.searchsorted(names, predicted)
    probability = probabilities[np.arange(len(x)), column]
    return Classification(
        pd.Categorical(predicted, categories=names), probability, accuracy, counts
    )


def read_annotations(path: str | Path, table: pd.DataFrame) -> pd.Categorical:
    """Annotations for the project rows of ``table`` from a CSV file of ``crop_index,class``
    or ``image_path,label,class`` rows (crops the file does not name: missing)."""
    path = Path(path)
    try:
        rows = pd.read_csv(path, dtype=str, keep_default_na=False)
    except (OSError, pd.errors.ParserError, UnicodeDecodeError) as err:
        raise InputError(f"cannot read the annotations {path}: {err}") from err
    except pd.errors.EmptyDataError:
        raise InputError(f"{path} is empty; write crop_index,class rows") from None
    rows.columns = rows.columns.str.strip()
    if CLASS not in rows or not (
        {"crop_index"} <= set(rows) or {"image_path", "label"} <= set(rows)
    ):
        raise InputError(
            f"{path} needs the columns crop_index,class or image_path,label,class; "
            f"it has {', '.join(rows.columns)}"
        )
    if len(rows) == 0:
        raise InputError(f"{path} holds no annotations")
    index = _crop_rows(rows, table, path)
    names = rows[CLASS].str.strip()
    if (names == "").any():
        line = int(np.flatnonzero(names == "")[0]) + 2
        raise InputError(f"{path} line {line}: the class is empty")
    clash = pd.DataFrame({"i": index, "name": names}).groupby("i")["name"].nunique()
    if (clash > 1).any():
        raise InputError(f"{path} gives crop {int(clash[clash > 1].index[0])} two classes")
    values = np.full(len(table), None, dtype=object)
    values[index] = names.to_numpy()
    return as_annotations(values)


def _crop_rows(rows: pd.DataFrame, table: pd.DataFrame, path: Path) -> np.ndarray:
    """The project row of each annotation row (refusing unknown crops, images or labels)."""
    if "crop_index" in rows:
        index = pd.to_numeric(rows["crop_index"].str.strip(), errors="coerce")
        bad = index.isna() | (index < 0) | (index >= len(table)) | (index % 1 != 0)
        if bad.any():
            line = int(np.flatnonzero(bad)[0])
            raise InputError(
                f"{path} line {line + 2}: crop {rows['crop_index'].iat[line]!r} does not exist "
                f"(the project has crops 0-{len(table) - 1})"
            )
        return index.to_numpy(np.int64)
    if "image_path" not in table:
        raise InputError(f"{path} names images, but the project records no image paths")
    known = table.reset_index(drop=True)
    keys = pd.MultiIndex.from_arrays([known["image_path"].astype(str), known["label"].astype(str)])
    lookup = pd.Series(np.arange(len(known)), index=keys)
    lookup = lookup[~lookup.index.duplicated()]
    images = set(known["image_path"].astype(str))
    out = np.empty(len(rows), dtype=np.int64)
    for i, (image, label) in enumerate(zip(rows["image_path"], rows["label"], strict=True)):
        image, label = image.strip(), label.strip()
        if image not in images:
            raise InputError(f"{path} line {i + 2}: no image {image!r} in the project")
        if (image, label) not in lookup.index:
            raise InputError(f"{path} line {i + 2}: {image!r} has no cropped nucleus {label}")
        out[i] = lookup[(image, label)]
    return out

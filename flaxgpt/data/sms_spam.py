"""The chapter-6 data: the SMS Spam Collection (UCI; Almeida & Gomez Hidalgo 2011; CC BY 4.0).

:func:`sms_spam_path` finds ``SMSSpamCollection`` offline (``$FLAXGPT_DATA_DIR/sms_spam_collection/
SMSSpamCollection.tsv``, then the cache) or downloads the UCI zip once into the cache (with the book's
backup URL), extracts the one member and checks its SHA-256. :func:`read_sms_spam` parses it as the book's
``pandas.read_csv(sep="\\t", header=None)`` does, and :func:`book_splits` balances and splits it exactly
as the book's ``create_balanced_dataset`` and ``random_split`` (pandas' ``sample`` is NumPy's
``RandomState(seed).choice(n, size, replace=False)``, so no pandas is needed): 1,045 / 149 / 300 rows.
"""

from __future__ import annotations

import csv
import dataclasses
import os
import zipfile
from pathlib import Path

import numpy as np

from flaxgpt.files import atomic_file
from flaxgpt.text.corpora import checked_data_file, download_file
from flaxgpt.validation import check_number

__all__ = [
    "SMS_SPAM_URLS",
    "SMS_SPAM_SHA256",
    "SMS_SPAM_LABELS",
    "LabeledTexts",
    "sms_spam_path",
    "read_sms_spam",
    "book_splits",
    "random_split",
    "load_sms_spam",
]

SMS_SPAM_URLS = (
    "https://archive.ics.uci.edu/static/public/228/sms+spam+collection.zip",
    "https://f001.backblazeb2.com/file/LLMs-from-scratch/sms%2Bspam%2Bcollection.zip",  # the book's backup
)
SMS_SPAM_SHA256 = "7d039a24a6083ed9ef0f806ebad56bbb976e3aeb8de05669173bfdc4996c239d"
SMS_SPAM_DIR = "sms_spam_collection"
SMS_SPAM_FILE = "SMSSpamCollection.tsv"
_ZIP_MEMBER = "SMSSpamCollection"
SMS_SPAM_LABELS = {"ham": 0, "spam": 1}


@dataclasses.dataclass(frozen=True)
class LabeledTexts:
    """Texts with integer class labels, in order.

    Attributes:
      texts: the texts.
      labels: (N,) int labels in [0, num_classes).
    """

    texts: tuple[str, ...]
    labels: np.ndarray

    def __len__(self) -> int:
        return len(self.texts)


def _download(dest: Path, urls: tuple[str, ...]) -> None:
    """Downloads the zip from the first URL that works and writes its one member to ``dest``."""
    errors = []
    for url in urls:
        zip_path = dest.parent / "sms_spam_collection.zip"
        try:
            download_file(url, zip_path)
            with zipfile.ZipFile(zip_path) as z:
                data = z.read(_ZIP_MEMBER)
        except (ConnectionError, zipfile.BadZipFile, KeyError) as e:
            errors.append(f"{url}: {e}")
            continue
        finally:
            zip_path.unlink(missing_ok=True)
        with atomic_file(dest, "wb") as f:
            f.write(data)
        return
    raise ConnectionError("could not download the SMS Spam Collection:\n  - " + "\n  - ".join(errors))


def sms_spam_path(urls: tuple[str, ...] = SMS_SPAM_URLS) -> Path:
    """The SMS Spam Collection file: ``$FLAXGPT_DATA_DIR/sms_spam_collection/SMSSpamCollection.tsv``, else the
    cached copy, else downloaded once into the cache (zip extracted, SHA-256 checked).

    Args:
      urls: the zip's URLs, tried in order.

    Returns:
      The path of the tab-separated file.

    Raises:
      ConnectionError: nothing local and no download worked.
      ValueError: the file's SHA-256 is not the collection's.
    """
    return checked_data_file(f"{SMS_SPAM_DIR}/{SMS_SPAM_FILE}", SMS_SPAM_SHA256, "the UCI SMS Spam Collection",
                             lambda dest: _download(dest, urls))


def read_sms_spam(path: str | os.PathLike[str] | None = None) -> tuple[list[str], list[str]]:
    """Parses the collection as ``pandas.read_csv(path, sep="\\t", header=None)`` does.

    Python's ``csv`` with a tab delimiter gives pandas' rows: a quoted field (line 5,082) spans three lines,
    so the 5,574 lines are 5,572 rows (4,825 ham, 747 spam).

    Args:
      path: the file (default: :func:`sms_spam_path`).

    Returns:
      ``(texts, labels)``: the messages and their "ham" / "spam" labels.
    """
    path = Path(path) if path is not None else sms_spam_path()
    with open(path, encoding="utf-8", newline="") as f:
        rows = list(csv.reader(f, delimiter="\t"))
    bad = [i + 1 for i, r in enumerate(rows) if len(r) != 2 or r[0] not in SMS_SPAM_LABELS]
    if bad:
        raise ValueError(f"{path}: rows {bad[:5]} are not 'ham|spam<TAB>text'")
    return [r[1] for r in rows], [r[0] for r in rows]


def book_splits(
    texts: list[str], labels: list[str], seed: int = 123, train_frac: float = 0.7, val_frac: float = 0.1
) -> dict[str, LabeledTexts]:
    """The book's ``create_balanced_dataset`` + ``random_split``: as many ham as spam, drawn with ``seed``,
    then all spam; shuffled with ``seed``; the first 70% train, the next 10% validation, the rest test.

    Args:
      texts: the messages, in file order.
      labels: their "ham" / "spam" labels.
      seed: pandas' ``random_state`` (the book: 123).
      train_frac: the training fraction.
      val_frac: the validation fraction.

    Returns:
      ``{"train": ..., "validation": ..., "test": ...}`` with labels ham 0, spam 1.
    """
    ham = [i for i, lab in enumerate(labels) if lab == "ham"]
    spam = [i for i, lab in enumerate(labels) if lab == "spam"]
    # df[ham].sample(n=len(spam), random_state=seed): RandomState(seed).choice(len(ham), n, replace=False)
    drawn = np.random.RandomState(seed).choice(len(ham), size=len(spam), replace=False)
    balanced = [ham[i] for i in drawn] + spam
    balanced_labels = np.asarray([SMS_SPAM_LABELS[labels[i]] for i in balanced], np.int32)
    return random_split(LabeledTexts(tuple(texts[i] for i in balanced), balanced_labels), seed, train_frac, val_frac)


def random_split(
    data: LabeledTexts, seed: int = 123, train_frac: float = 0.7, val_frac: float = 0.1
) -> dict[str, LabeledTexts]:
    """The book's ``random_split``: shuffle as ``df.sample(frac=1, random_state=seed)``, then the first
    ``train_frac`` for training, the next ``val_frac`` for validation, the rest for testing.

    Args:
      data: the rows, in order.
      seed: pandas' ``random_state``.
      train_frac: the training fraction.
      val_frac: the validation fraction.

    Returns:
      ``{"train": ..., "validation": ..., "test": ...}``.
    """
    check_number("train_frac", train_frac, 0.0, 1.0, open_low=True)
    check_number("val_frac", val_frac, 0.0, 1.0 - train_frac)
    n = len(data)
    order = np.random.RandomState(seed).choice(n, size=n, replace=False)  # df.sample(frac=1)
    train_end = int(n * train_frac)
    val_end = train_end + int(n * val_frac)
    parts = {"train": order[:train_end], "validation": order[train_end:val_end], "test": order[val_end:]}
    return {name: LabeledTexts(tuple(data.texts[i] for i in idx), data.labels[idx]) for name, idx in parts.items()}


def load_sms_spam(path: str | os.PathLike[str] | None = None, seed: int = 123) -> dict[str, LabeledTexts]:
    """The book's three splits of the SMS Spam Collection (1,045 / 149 / 300 rows).

    Args:
      path: the collection's file (default: :func:`sms_spam_path`).
      seed: the balancing and shuffling seed.

    Returns:
      ``{"train", "validation", "test"}`` -> :class:`LabeledTexts`.
    """
    return book_splits(*read_sms_spam(path), seed=seed)


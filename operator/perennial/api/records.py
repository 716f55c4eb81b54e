"""The feedback store's record schemas live in the pure `perennial_records` package (no operator
dependency), so that the server image can import them without the operator; re-exported here."""

from perennial_records import *  # noqa: F401,F403
from perennial_records import RECORD_SCHEMA_VERSION, ChatMessage, FeedbackRecord, FeedbackType, InteractionRecord, Record, Usage, parse_record, random_hex, segment_name  # noqa: F401

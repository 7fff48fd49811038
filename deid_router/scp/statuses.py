"""C-STORE statuses this node answers with (PS3.4 Annex B.2.3), named once."""

SUCCESS = 0x0000
OUT_OF_RESOURCES = 0xA700  # disk, database or free-space reserve: the modality should retry
DATASET_DOES_NOT_MATCH_SOP_CLASS = 0xA900  # command and dataset disagree on the SOP class
CANNOT_UNDERSTAND = 0xC000  # unparseable dataset, or command and dataset disagree on the instance
SOP_CLASS_NOT_SUPPORTED = 0x0122  # no route wants this instance: refused, never silently dropped

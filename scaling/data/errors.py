"""The data layer's errors, in a leaf module so that every data module can raise them."""


class DataError(ValueError):
    """Bad input data: a missing or damaged dataset, shard, image or label."""


class UnreadableImage(DataError):
    """One input image that does not decode (a writer skips and counts it unless strict)."""

"""Where events come from. Every adapter hands JSON objects shaped like upstream's webhook
envelope to ``Intake`` (``router.intake``) and never touches routing or the store itself."""

"""Workers this gateway starts itself: the local-process launcher (``launcher``) and the
child-process helpers it shares with `strata serve` (``processes``)."""

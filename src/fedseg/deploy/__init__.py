"""Running fedseg across real machines: key material (:mod:`.provision`) and test networks
(:mod:`.netns`, network namespaces for the failure drills)."""

"""The @deploy composition a deploy file calls: spec, pre-flight, plan, operations."""

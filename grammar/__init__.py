"""The pattern language's lark grammar (shipped inside the package as patterncc.grammar)."""

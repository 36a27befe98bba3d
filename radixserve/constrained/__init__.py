"""Grammar-constrained output (xgrammar): JSON schema, regex, EBNF and tool-call grammars."""

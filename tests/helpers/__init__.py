"""Helpers shared by the tests (no tests here): `helpers.service` starts real services and builds prompt sets;
`helpers.reliability` adds raw requests, a loop of good traffic and memory readers."""

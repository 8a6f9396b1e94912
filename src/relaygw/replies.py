"""Named SMTP replies, every one with its RFC 3463 enhanced status code.

Tests compare against these names rather than re-typing strings. Replies that
carry a variable part are functions.
"""

from __future__ import annotations

OK = "250 2.0.0 Ok"
SENDER_OK = "250 2.1.0 Ok"
RECIPIENT_OK = "250 2.1.5 Ok"
START_DATA = "354 End data with <CR><LF>.<CR><LF>"
BYE = "221 2.0.0 Bye"
HELP = "214 2.0.0 Commands: HELO EHLO MAIL RCPT DATA RSET NOOP QUIT HELP VRFY ETRN"
VRFY = "252 2.0.0 Cannot VRFY user, but will accept message and attempt delivery"
ETRN_STARTED = "250 2.0.0 Queuing started"

UNKNOWN_COMMAND = "500 5.5.2 Error: command not recognized"
BARE_NEWLINE_COMMAND = "500 5.5.2 Error: bare CR or LF in command"
COMMAND_TOO_LONG = "500 5.5.2 Error: command line too long"
SYNTAX_HELO = "501 5.5.4 Syntax: EHLO hostname"
SYNTAX_MAIL = "501 5.5.4 Syntax: MAIL FROM:<address>"
SYNTAX_RCPT = "501 5.5.4 Syntax: RCPT TO:<address>"
SYNTAX_NO_ARGS = "501 5.5.4 Syntax error: no arguments allowed"
SYNTAX_ETRN = "501 5.5.4 Syntax: ETRN domain"
BAD_SENDER = "501 5.1.7 Bad sender address syntax"
BAD_RECIPIENT = "501 5.1.3 Bad recipient address syntax"
BAD_PARAMETER = "501 5.5.4 Bad parameter value"
UNKNOWN_PARAMETER = "555 5.5.4 Unsupported MAIL parameter"
NOT_IMPLEMENTED = "502 5.5.1 Error: command not implemented"
TURN_REFUSED = "502 5.5.1 TURN is not supported: use ETRN"
NEED_HELO = "503 5.5.1 Error: send HELO/EHLO first"
NESTED_MAIL = "503 5.5.1 Error: nested MAIL command"
NEED_MAIL = "503 5.5.1 Error: need MAIL command"
NEED_RCPT = "503 5.5.1 Error: need RCPT command"
NO_VALID_RECIPIENTS = "554 5.5.1 Error: no valid recipients"  # RCPTs given, none taken
IN_TRANSACTION = "503 5.5.1 Error: MAIL transaction in progress"
AUTH_REQUIRED = "530 5.7.0 Authentication required"
TOO_MANY_RECIPIENTS = "452 4.5.3 Error: too many recipients"
SIZE_EXCEEDED = "552 5.3.4 Error: message file too big"
TOO_MANY_HOPS = "554 5.4.6 Error: too many hops (mail loop?)"
BARE_NEWLINE_DATA = "550 5.5.2 Error: bare CR or LF in message data is not allowed"
DATA_LINE_TOO_LONG = "550 5.5.2 Error: message line longer than 1000 octets"
NO_STORAGE = "452 4.3.1 Insufficient system storage"
LOCAL_ERROR = "451 4.3.0 Error: queue file write error"
ETRN_DENIED = "459 4.7.1 ETRN not allowed for this client"
TLS_UNAVAILABLE = "454 4.7.0 TLS not available"
READY_FOR_TLS = "220 2.0.0 Ready to start TLS"
SYNTAX_STARTTLS = "501 5.5.4 Syntax: STARTTLS"
TLS_ALREADY_ACTIVE = "503 5.5.1 Error: TLS already active"

AUTH_OK = "235 2.7.0 Authentication successful"
AUTH_FAILED = "535 5.7.8 Authentication credentials invalid"
AUTH_NEEDS_TLS = "538 5.7.11 Encryption required for requested authentication mechanism"
AUTH_ALREADY = "503 5.5.1 Error: already authenticated"
AUTH_IN_TRANSACTION = "503 5.5.1 Error: MAIL transaction in progress"
AUTH_SYNTAX = "501 5.5.4 Syntax: AUTH mechanism [initial-response]"
AUTH_UNKNOWN_MECHANISM = "504 5.5.4 Unrecognized authentication type"
AUTH_BAD_BASE64 = "501 5.5.2 Cannot decode response"
AUTH_TEMPORARY = "454 4.7.0 Temporary authentication failure"
AUTH_CANCELLED = "501 5.7.0 Authentication cancelled"
AUTH_CHALLENGE = "334 "
AUTH_USERNAME = "334 VXNlcm5hbWU6"   # base64 "Username:"
AUTH_PASSWORD = "334 UGFzc3dvcmQ6"   # base64 "Password:"


def banner(hostname: str) -> str:
    return f"220 {hostname} ESMTP relaygw"


def queued(queue_id: str) -> str:
    return f"250 2.0.0 Ok: queued as {queue_id}"


def too_many_connections(hostname: str) -> str:
    return f"421 4.7.0 {hostname} Error: too many connections"


def too_many_errors(hostname: str) -> str:
    return f"421 4.7.0 {hostname} Error: too many errors"


def too_many_auth_failures(hostname: str) -> str:
    return f"421 4.7.0 {hostname} Error: too many authentication failures"


def timeout(hostname: str) -> str:
    return f"421 4.4.2 {hostname} Error: timeout exceeded"


def shutting_down(hostname: str) -> str:
    return f"421 4.3.2 {hostname} Service shutting down"

#!/usr/bin/env python3
"""Writes the seed corpora under fuzz/corpus/<target>/ (deterministic; re-run to regenerate).

Tokens are HS256 under the fuzz targets' secret (fuzz/src/lib.rs SECRET) and expire in 2100,
so the fuzzer starts from accepted handshakes; records are byte-for-byte what
`courier::protocol::encode_event` writes.
"""
import base64, hashlib, hmac, json, os, random, shutil

SECRET = b"courier-fuzz-secret"
FAR = 4102444800  # 2100-01-01
HERE = os.path.dirname(os.path.abspath(__file__))


def b64(b):
    return base64.urlsafe_b64encode(b).rstrip(b"=").decode()


def jwt(claims, header=None, key=SECRET, alg="HS256"):
    header = header if header is not None else {"alg": alg, "typ": "JWT"}
    h = header if isinstance(header, bytes) else json.dumps(header, separators=(",", ":")).encode()
    c = claims if isinstance(claims, bytes) else json.dumps(claims, separators=(",", ":")).encode()
    msg = f"{b64(h)}.{b64(c)}"
    digest = {"HS256": hashlib.sha256, "HS384": hashlib.sha384, "HS512": hashlib.sha512}.get(alg, hashlib.sha256)
    sig = "" if alg == "none" else b64(hmac.new(key, msg.encode(), digest).digest())
    return f"{msg}.{sig}"


def js(s):
    return json.dumps(s, ensure_ascii=False, separators=(",", ":"))


def event(seq, ts, fields):
    out = '{"t":"ev","seq":%d,"ts":%d' % (seq, ts)
    for k, v in fields:
        out += "," + js(k) + ":" + (v if k == "members" else js(v))
    return (out + "}").encode()


def write(target, seeds):
    d = os.path.join(HERE, "corpus", target)
    shutil.rmtree(d, ignore_errors=True)
    os.makedirs(d)
    for name, data in seeds:
        if isinstance(data, str):
            data = data.encode()
        with open(os.path.join(d, name), "wb") as f:
            f.write(data)


ALICE = {"sub": "alice", "dev": "phone", "exp": FAR}
GOOD = jwt(ALICE)

write("client_frame", [
    ("ack", '{"t":"ack","seq":42}'),
    ("ack_negative", '{"t":"ack","seq":-1}'),
    ("ack_string_seq", '{"t":"ack","seq":"42","id":"a1"}'),
    ("send_direct", '{"t":"send","id":"c1","to":"bob","body":"hi"}'),
    ("send_group_unicode", '{"t":"send","id":"c.2-x_Y","to":"g:team","body":"h\\u00e9 \\"q\\" \\ud83d\\ude00 \\n"}'),
    ("send_missing_body", '{"t":"send","id":"c3","to":"bob"}'),
    ("send_empty_body_null_id", '{"t":"send","id":null,"to":"bob","body":""}'),
    ("send_bad_to", '{"t":"send","id":"c4","to":"g:a:b","body":"x"}'),
    ("send_long_id", '{"t":"send","id":"' + "x" * 65 + '","to":"bob","body":"x"}'),
    ("send_too_large", '{"t":"send","id":"c5","to":"bob","body":"0123456789abcdef0"}'),
    ("read", '{"t":"read","chat":"bob","up_to":"178431000001"}'),
    ("read_bad_msg", '{"t":"read","chat":"g:team","up_to":"+1","msg":"7"}'),
    ("typing_on", '{"t":"typing","chat":"g:team","on":true}'),
    ("typing_not_bool", '{"t":"typing","chat":"bob","on":1}'),
    ("edit", '{"t":"edit","id":"e1","msg":"18446744073709551615","body":"fixed"}'),
    ("edit_overflow_msg", '{"t":"edit","msg":"18446744073709551616","body":"x"}'),
    ("delete_everyone", '{"t":"delete","msg":"12","scope":"everyone"}'),
    ("delete_me", '{"t":"delete","msg":"12","scope":"me","id":"d1"}'),
    ("delete_bad_scope", '{"t":"delete","msg":"12","scope":"all"}'),
    ("group_create", '{"t":"group","op":"create","chat":"g:team","members":["bob","carol"]}'),
    ("group_create_empty", '{"t":"group","op":"create","chat":"g:solo"}'),
    ("group_add", '{"t":"group","op":"add","chat":"g:team","members":["dave"]}'),
    ("group_remove_bad_member", '{"t":"group","op":"remove","chat":"g:team","members":["bo b",3]}'),
    ("group_leave", '{"t":"group","op":"leave","chat":"g:team"}'),
    ("group_direct_chat", '{"t":"group","op":"add","chat":"bob","members":["x"]}'),
    ("devices", '{"t":"devices"}'),
    ("unlink", '{"t":"unlink","device":"tablet"}'),
    ("unlink_empty", '{"t":"unlink","device":""}'),
    ("history", '{"t":"history","chat":"bob","before":"178431000001","limit":20}'),
    ("history_defaults", '{"t":"history","chat":"g:team","before":null,"limit":null}'),
    ("history_limit_zero", '{"t":"history","chat":"bob","limit":0}'),
    ("history_limit_huge", '{"t":"history","chat":"bob","limit":18446744073709551615}'),
    ("dev_clock", '{"t":"dev_clock","advance_ms":60000}'),
    ("unknown_type", '{"t":"fly","id":"u1"}'),
    ("type_not_string", '{"t":5}'),
    ("not_json", '{nope'),
    ("array", '[1,2,{"t":"ack"}]'),
    ("nested", '{"t":"ack","seq":1,"x":' + "[" * 200 + "]" * 200 + "}"),
    ("duplicate_keys", '{"t":"ack","t":"send","id":"c1","to":"bob","body":"hi","seq":1}'),
    ("float_seq", '{"t":"ack","seq":1.0e3}'),
])

TOKEN_PARAM = "token=" + GOOD
# Flag byte: 1 dev, 2 secret configured, 4 query present, 8 Authorization present.
write("auth_handshake", [
    ("token_query", bytes([2 | 4]) + TOKEN_PARAM.encode()),
    ("token_header", bytes([2 | 8]) + ("\nBearer " + GOOD).encode()),
    ("token_header_spaces", bytes([2 | 8]) + ("\nBearer   " + GOOD + "  ").encode()),
    ("token_encoded_key", bytes([2 | 4]) + ("%74oken=" + GOOD + "&x=1").encode()),
    ("dev_user_device", bytes([1 | 4]) + b"user=alice&device=phone"),
    ("dev_percent", bytes([1 | 4]) + b"user=al%69ce&device=ph%2Eone&&=&x"),
    ("dev_bad_escape", bytes([1 | 4]) + b"user=%zz&device=%"),
    ("dev_plus_space", bytes([1 | 4]) + b"user=a+b&device=phone"),
    ("dev_token_wins", bytes([1 | 2 | 4]) + ("user=mallory&device=evil&token=" + jwt({"sub": "alice", "dev": "phone", "exp": 1})).encode()),
    ("not_dev_no_token", bytes([2 | 4]) + b"user=alice&device=phone"),
    ("alg_none", bytes([2 | 4]) + ("token=" + jwt(ALICE, alg="none")).encode()),
    ("hs384", bytes([2 | 4]) + ("token=" + jwt(ALICE, alg="HS384")).encode()),
    ("expired", bytes([2 | 8]) + ("\nBearer " + jwt({"sub": "alice", "dev": "phone", "exp": 1000})).encode()),
    ("not_yet_valid", bytes([2 | 4]) + ("token=" + jwt({"sub": "alice", "dev": "phone", "exp": FAR, "nbf": FAR - 1})).encode()),
    ("wrong_key", bytes([2 | 4]) + ("token=" + jwt(ALICE, key=b"wrong")).encode()),
    ("basic_auth", bytes([1 | 2 | 8 | 4]) + b"user=alice&device=phone\nBasic YWxpY2U6cHc="),
    ("empty_token", bytes([1 | 2 | 4]) + b"token=&user=alice&device=phone"),
    ("no_secret", bytes([1 | 4]) + TOKEN_PARAM.encode()),
    ("bad_id_claim", bytes([2 | 4]) + ("token=" + jwt({"sub": "al ice", "dev": "phone", "exp": FAR})).encode()),
    ("garbage_token", bytes([2 | 8]) + b"\nBearer not.a.token"),
])

# Flag byte: 1 right key, 2 via Authorization (else ?token=), 4 dev mode, 8 impostor query.
HS = b'{"alg":"HS256","typ":"JWT"}'
def claims_seed(flags, header, claims):
    return bytes([flags]) + header + b"\n" + claims
write("auth_jwt_claims", [
    ("valid", claims_seed(1, HS, b'{"sub":"alice","dev":"phone","exp":4102444800}')),
    ("valid_header", claims_seed(1 | 2, HS, b'{"sub":"alice","dev":"phone","exp":4102444800}')),
    ("valid_impostor_dev", claims_seed(1 | 4 | 8, HS, b'{"sub":"alice","dev":"phone","exp":4102444800}')),
    ("wrong_key", claims_seed(0, HS, b'{"sub":"alice","dev":"phone","exp":4102444800}')),
    ("exp_float", claims_seed(1, HS, b'{"sub":"alice","dev":"phone","exp":4102444800.75}')),
    ("exp_string", claims_seed(1, HS, b'{"sub":"alice","dev":"phone","exp":"4102444800"}')),
    ("expired", claims_seed(1, HS, b'{"sub":"alice","dev":"phone","exp":1700000000}')),
    ("nbf_past", claims_seed(1, HS, b'{"sub":"a.b-c_D9","dev":"d","exp":4102444800,"nbf":1}')),
    ("nbf_future", claims_seed(1, HS, b'{"sub":"alice","dev":"phone","exp":4102444800,"nbf":4102444000}')),
    ("alg_none", claims_seed(1, b'{"alg":"none"}', b'{"sub":"alice","dev":"phone","exp":4102444800}')),
    ("alg_hs512", claims_seed(1, b'{"alg":"HS512","typ":"JWT"}', b'{"sub":"alice","dev":"phone","exp":4102444800}')),
    ("alg_rs256", claims_seed(1, b'{"alg":"RS256","kid":"k1"}', b'{"sub":"alice","dev":"phone","exp":4102444800}')),
    ("alg_duplicate", claims_seed(1, b'{"alg":"HS256","alg":"none"}', b'{"sub":"alice","dev":"phone","exp":4102444800}')),
    ("b64_false", claims_seed(1, b'{"alg":"HS256","b64":false,"crit":["b64"]}', b'{"sub":"alice","dev":"phone","exp":4102444800}')),
    ("aud", claims_seed(1, HS, b'{"sub":"alice","dev":"phone","exp":4102444800,"aud":"courier"}')),
    ("sub_bad_id", claims_seed(1, HS, b'{"sub":"al ice","dev":"phone","exp":4102444800}')),
    ("sub_number", claims_seed(1, HS, b'{"sub":7,"dev":"phone","exp":4102444800}')),
    ("sub_escaped", claims_seed(1, HS, b'{"sub":"\\u0061lice","dev":"ph\\u006fne","exp":4102444800}')),
    ("dev_missing", claims_seed(1, HS, b'{"sub":"alice","exp":4102444800}')),
    ("sub_duplicate", claims_seed(1, HS, b'{"sub":"alice","sub":"mallory","dev":"phone","exp":4102444800}')),
    ("claims_not_json", claims_seed(1, HS, b'\xff\x00not json')),
])

MSG = 178431000001
write("lmdb_record", [
    ("msg", event(7, 1733150000123, [("kind", "msg"), ("chat", "bob"), ("msg", str(MSG)), ("from", "alice"), ("dev", "phone"), ("body", "hi")])),
    ("msg_escaped", event(8, 1733150000124, [("kind", "msg"), ("chat", "g:team"), ("msg", str(MSG + 1)), ("from", "alice"), ("dev", "phone"), ("body", 'h\u00e9 "q" \\ \n\t\x01 \u2028 \U0001f600')])),
    ("device", event(1, 1733150000000, [("kind", "device"), ("op", "linked"), ("device", "phone")])),
    ("receipt", event(9, 1733150000200, [("kind", "receipt"), ("chat", "bob"), ("by", "bob"), ("status", "delivered"), ("up_to", str(MSG))])),
    ("read", event(10, 1733150000300, [("kind", "read"), ("chat", "bob"), ("up_to", str(MSG))])),
    ("group", event(11, 1733150000400, [("kind", "group"), ("chat", "g:team"), ("op", "created"), ("members", '["alice","bob","carol"]'), ("by", "alice")])),
    ("edit", event(12, 1733150000500, [("kind", "edit"), ("chat", "bob"), ("msg", str(MSG)), ("body", "fixed")])),
    ("delete", event(13, 1733150000600, [("kind", "delete"), ("chat", "bob"), ("msg", str(MSG)), ("scope", "everyone")])),
    ("max_numbers", event(18446744073709551615, 18446744073709551615, [("kind", "msg"), ("chat", "a"), ("msg", "18446744073709551615"), ("from", "b"), ("dev", "c"), ("body", "")])),
    ("msg_with_new_body", event(7, 1733150000123, [("kind", "msg"), ("chat", "bob"), ("msg", str(MSG)), ("from", "alice"), ("dev", "phone"), ("body", "hi")]) + b"\xffnew \"body\" \xc3\xa9"),
    ("edited_already", b'{"t":"ev","seq":7,"ts":1733150000123,"kind":"msg","chat":"bob","msg":"178431000001","from":"alice","dev":"phone","body":"v2","edited":true}'),
    ("torn", event(7, 1733150000123, [("kind", "msg"), ("chat", "bob"), ("msg", str(MSG)), ("from", "alice"), ("dev", "phone"), ("body", "hi")])[:40]),
    ("seq_overflow", b'{"t":"ev","seq":18446744073709551616,"ts":1,"kind":"read","chat":"bob","up_to":"1"}'),
    ("msg_id_number", b'{"t":"ev","seq":1,"ts":1,"kind":"msg","chat":"bob","msg":178431000001,"from":"alice","dev":"phone","body":"x"}'),
    ("not_object", b'["t","ev"]'),
    ("empty", b""),
])

rng = random.Random(5)
roundtrip = [(f"random_{n}", bytes(rng.randrange(256) for _ in range(n))) for n in (8, 16, 32, 64, 128, 256, 512, 1024)]
roundtrip += [
    ("ascii_text", b"alice\x00bob\x00phone\x00hello world, this is a body\x00"),
    ("quotes_and_escapes", b'\x07\x00\x00\x00\x00\x00\x00\x00\x2a\x00\x00\x00"\\\n\t\x01\x1f\x7f</script>\x00'),
    ("utf8_mix", "\u00e9\u2028\u2029\U0001f600\ufeff\u0000 \"\\ g:team".encode() * 4),
    ("group_members", b"\x04\x00\x00\x00\x00\x00\x00\x00\x05\x00\x00\x00\x00\x00\x00\x00\x04g:team\x02alice\x03bob\x05carol\x01by"),
]
write("record_roundtrip", roundtrip)
print("seed corpora written under", os.path.join(HERE, "corpus"))

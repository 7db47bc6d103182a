//! Reading what a request is about: the routing table, the resource field
//! of a gRPC request body, and header and percent-encoding helpers.

use http::HeaderMap;

/// Which field of each request names its resource, and the key
/// `x-goog-request-params` must give it under (as Google's clients send it).
pub(super) fn routing(method: &str) -> Option<(&'static str, Field)> {
    Some(match method {
        "Publisher/CreateTopic" | "Subscriber/CreateSubscription" => ("name", Field::First),
        "Publisher/UpdateTopic" => ("topic.name", Field::FirstOfFirst),
        "Publisher/Publish" | "Publisher/GetTopic" | "Publisher/DeleteTopic" => {
            ("topic", Field::First)
        }
        "Subscriber/UpdateSubscription" => ("subscription.name", Field::FirstOfFirst),
        "Subscriber/GetSubscription"
        | "Subscriber/DeleteSubscription"
        | "Subscriber/Pull"
        | "Subscriber/Acknowledge"
        | "Subscriber/ModifyAckDeadline" => ("subscription", Field::First),
        _ => return None,
    })
}

/// Where a request keeps its resource name.
#[derive(Debug, Clone, Copy)]
pub(super) enum Field {
    /// Field 1 (`GetSubscriptionRequest.subscription`, `Topic.name`, ...).
    First,
    /// Field 1 of the message in field 1 (`UpdateTopicRequest.topic.name`).
    FirstOfFirst,
}

pub(super) fn header(headers: &HeaderMap, name: &str) -> Option<String> {
    headers
        .get(name)
        .and_then(|v| v.to_str().ok())
        .map(str::to_string)
}

pub(super) fn bearer(headers: &HeaderMap) -> Option<String> {
    header(headers, "authorization")?
        .strip_prefix("Bearer ")
        .map(str::to_string)
}

/// The message of an uncompressed gRPC frame.
pub(super) fn grpc_message(body: &[u8]) -> Option<&[u8]> {
    let (&compressed, rest) = body.split_first()?;
    let len = u32::from_be_bytes(rest.get(..4)?.try_into().ok()?) as usize;
    (compressed == 0).then_some(rest.get(4..4 + len)?)
}

/// The resource name a request carries in `field`.
pub(super) fn resource(message: &[u8], field: Field) -> Option<String> {
    let first = field_one(message)?;
    let name = match field {
        Field::First => first,
        Field::FirstOfFirst => field_one(first)?,
    };
    String::from_utf8(name.to_vec()).ok()
}

/// The bytes of field 1 (length-delimited) of a protobuf message.
pub(super) fn field_one(mut message: &[u8]) -> Option<&[u8]> {
    while !message.is_empty() {
        let key = varint(&mut message)?;
        match key & 7 {
            0 => {
                varint(&mut message)?;
            }
            1 => message = message.get(8..)?,
            5 => message = message.get(4..)?,
            2 => {
                let len = usize::try_from(varint(&mut message)?).ok()?;
                let value = message.get(..len)?;
                if key >> 3 == 1 {
                    return Some(value);
                }
                message = &message[len..];
            }
            _ => return None,
        }
    }
    None
}

pub(super) fn varint(buf: &mut &[u8]) -> Option<u64> {
    let mut value = 0u64;
    for shift in (0..64).step_by(7) {
        let (&byte, rest) = buf.split_first()?;
        *buf = rest;
        value |= u64::from(byte & 0x7f) << shift;
        if byte & 0x80 == 0 {
            return Some(value);
        }
    }
    None
}

pub(super) fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%'
            && let Some(b) = s
                .get(i + 1..i + 3)
                .and_then(|h| u8::from_str_radix(h, 16).ok())
        {
            out.push(b);
            i += 3;
            continue;
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

pub(super) fn percent_encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b' '..=b'~' if b != b'%' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

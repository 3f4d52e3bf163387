//! Anthropic Messages requests (`POST /v1/messages`, and the body of
//! `POST /v1/messages/count_tokens`).
//!
//! The types read what Anthropic clients send and tolerate what they do not
//! know: unknown top-level fields land in [`MessagesRequest::extra`], unknown
//! fields inside blocks are ignored (`cache_control`, `citations`), and a
//! content block of an unknown type is kept as [`ContentBlock::Other`] so that
//! [`to_chat`](crate::to_chat) decides what to do with it instead of the
//! parser failing the whole request.

use std::fmt;

use serde::de::{self, Deserializer, SeqAccess, Visitor};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::error::TranslateError;

/// A Messages request.
///
/// `max_tokens` is optional here, although `/v1/messages` requires it,
/// because the same type reads `count_tokens` bodies, which have none.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MessagesRequest {
    /// The model asked for (`claude-sonnet-4-5-20250929`); passed through.
    pub model: String,
    /// The conversation, oldest first.
    pub messages: Vec<Message>,
    /// The system prompt: a string or text blocks.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub system: Option<System>,
    /// The most tokens to generate.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_tokens: Option<u64>,
    /// Sampling temperature.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub temperature: Option<f64>,
    /// Nucleus sampling.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub top_p: Option<f64>,
    /// Top-k sampling (no OpenAI equivalent; see [`Options::top_k`](crate::Options::top_k)).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub top_k: Option<u64>,
    /// Strings that end generation.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stop_sequences: Option<Vec<String>>,
    /// Whether to answer with server-sent events.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stream: Option<bool>,
    /// Tools the model may call.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tools: Option<Vec<Tool>>,
    /// Whether and which tool the model must call.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tool_choice: Option<ToolChoice>,
    /// `{"user_id": …}`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metadata: Option<Value>,
    /// Extended thinking: `{"type":"enabled","budget_tokens":N}` or
    /// `{"type":"disabled"}`, kept as JSON because its shape keeps growing.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub thinking: Option<Value>,
    /// Every other top-level field, so that a caller can see (and report)
    /// what the translation drops: `service_tier`, `container`,
    /// `mcp_servers`, …
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

impl MessagesRequest {
    /// Reads a request body. Errors say what serde found and where
    /// (`missing field 'model' at line 1 column 42`).
    pub fn from_slice(body: &[u8]) -> Result<Self, TranslateError> {
        serde_json::from_slice(body).map_err(|e| TranslateError::InvalidRequest { reason: e.to_string() })
    }

    /// Whether it asks for a stream.
    pub fn is_stream(&self) -> bool {
        self.stream == Some(true)
    }
}

/// One turn of the conversation.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Message {
    /// Who speaks.
    pub role: Role,
    /// What they say.
    pub content: MessageContent,
}

/// A message's author.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// The client (and its tool results).
    User,
    /// The model.
    Assistant,
}

/// Content: a plain string or a list of blocks. Also a `tool_result`'s
/// content.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(untagged)]
pub enum MessageContent {
    /// A plain string: one text block.
    Text(String),
    /// Blocks, in order.
    Blocks(Vec<ContentBlock>),
}

/// The system prompt: a string, or text blocks (which Claude Code sends with
/// `cache_control`, ignored here).
pub type System = MessageContent;

/// One content block.
///
/// Blocks of a type this crate does not model (`thinking`,
/// `redacted_thinking`, `document`, `server_tool_use`, …) are kept whole as
/// [`ContentBlock::Other`]; [`to_chat`](crate::to_chat) drops thinking
/// blocks and refuses the rest with an error that names them.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ContentBlock {
    /// `{"type":"text","text":…}`.
    Text(TextBlock),
    /// `{"type":"image","source":…}`.
    Image(ImageBlock),
    /// The model's call of a tool (in assistant messages).
    ToolUse(ToolUseBlock),
    /// A tool's answer (in user messages).
    ToolResult(ToolResultBlock),
    /// Any other block, as sent.
    #[serde(untagged)]
    Other(Value),
}

impl ContentBlock {
    /// Its `type`.
    pub fn kind(&self) -> &str {
        match self {
            ContentBlock::Text(_) => "text",
            ContentBlock::Image(_) => "image",
            ContentBlock::ToolUse(_) => "tool_use",
            ContentBlock::ToolResult(_) => "tool_result",
            ContentBlock::Other(value) => value.get("type").and_then(Value::as_str).unwrap_or("(none)"),
        }
    }
}

/// A text block.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TextBlock {
    /// The text.
    pub text: String,
    /// Anthropic's prompt-cache marker: kept for round trips, ignored by the
    /// translation (chat upstreams cache, if at all, by themselves).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cache_control: Option<Value>,
}

impl TextBlock {
    /// A text block saying `text`.
    pub fn new(text: impl Into<String>) -> Self {
        Self { text: text.into(), cache_control: None }
    }
}

/// An image block.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ImageBlock {
    /// Where the image is.
    pub source: ImageSource,
}

/// An image's bytes or address.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ImageSource {
    /// Inline: `{"type":"base64","media_type":"image/png","data":…}`.
    Base64 {
        /// `image/jpeg`, `image/png`, `image/gif` or `image/webp`.
        media_type: String,
        /// The base64 bytes.
        data: String,
    },
    /// `{"type":"url","url":…}`.
    Url {
        /// The image's URL.
        url: String,
    },
}

/// The model's call of a tool.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ToolUseBlock {
    /// The call's id, which the `tool_result` names.
    pub id: String,
    /// The tool.
    pub name: String,
    /// Its arguments (a JSON object).
    pub input: Value,
}

/// A tool's answer to a [`ToolUseBlock`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ToolResultBlock {
    /// The call answered.
    pub tool_use_id: String,
    /// The answer: a string or text and image blocks (absent: empty).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub content: Option<MessageContent>,
    /// Whether the tool failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub is_error: Option<bool>,
}

/// A tool the model may call.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Tool {
    /// Its name.
    pub name: String,
    /// What it does, for the model.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    /// A JSON schema of its input (absent for Anthropic's own tools).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub input_schema: Option<Value>,
    /// Absent or `custom` for a client tool; a versioned name
    /// (`web_search_20250305`, `bash_20250124`) for Anthropic's own tools,
    /// which chat upstreams do not have.
    #[serde(rename = "type", default, skip_serializing_if = "Option::is_none")]
    pub kind: Option<String>,
    /// Prompt-cache marker, ignored.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cache_control: Option<Value>,
}

/// Whether and which tool the model must call.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ToolChoice {
    /// The model decides.
    Auto {
        /// At most one call per answer.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        disable_parallel_tool_use: Option<bool>,
    },
    /// The model must call some tool.
    Any {
        /// At most one call per answer.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        disable_parallel_tool_use: Option<bool>,
    },
    /// The model must call this tool.
    Tool {
        /// The tool.
        name: String,
        /// At most one call per answer.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        disable_parallel_tool_use: Option<bool>,
    },
    /// The model must not call tools.
    None,
}

impl ToolChoice {
    /// Whether it asks for at most one tool call.
    pub fn disables_parallel_tool_use(&self) -> bool {
        match self {
            ToolChoice::Auto { disable_parallel_tool_use }
            | ToolChoice::Any { disable_parallel_tool_use }
            | ToolChoice::Tool { disable_parallel_tool_use, .. } => *disable_parallel_tool_use == Some(true),
            ToolChoice::None => false,
        }
    }
}

// Content is a string or a list: a visitor rather than `#[serde(untagged)]`,
// so that a bad block's own error reaches the client instead of "data did not
// match any variant".
impl<'de> Deserialize<'de> for MessageContent {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct ContentVisitor;

        impl<'de> Visitor<'de> for ContentVisitor {
            type Value = MessageContent;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a string or an array of content blocks")
            }

            fn visit_str<E: de::Error>(self, v: &str) -> Result<Self::Value, E> {
                Ok(MessageContent::Text(v.to_owned()))
            }

            fn visit_string<E: de::Error>(self, v: String) -> Result<Self::Value, E> {
                Ok(MessageContent::Text(v))
            }

            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
                let mut blocks = Vec::with_capacity(seq.size_hint().unwrap_or(1).min(64));
                while let Some(block) = seq.next_element::<ContentBlock>()? {
                    blocks.push(block);
                }
                Ok(MessageContent::Blocks(blocks))
            }
        }

        deserializer.deserialize_any(ContentVisitor)
    }
}

// A block's type picks its struct; an unknown type is kept as JSON.
impl<'de> Deserialize<'de> for ContentBlock {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let value = Value::deserialize(deserializer)?;
        let kind = match value.get("type") {
            Some(Value::String(kind)) => match kind.as_str() {
                "text" => Known::Text,
                "image" => Known::Image,
                "tool_use" => Known::ToolUse,
                "tool_result" => Known::ToolResult,
                _ => return Ok(ContentBlock::Other(value)),
            },
            Some(_) => return Err(de::Error::custom("content block `type` is not a string")),
            None => return Err(de::Error::custom("content block without a `type`")),
        };
        // Owned: the strings move out of the JSON value instead of being copied.
        let block = match kind {
            Known::Text => TextBlock::deserialize(value).map(ContentBlock::Text),
            Known::Image => ImageBlock::deserialize(value).map(ContentBlock::Image),
            Known::ToolUse => ToolUseBlock::deserialize(value).map(ContentBlock::ToolUse),
            Known::ToolResult => ToolResultBlock::deserialize(value).map(ContentBlock::ToolResult),
        };
        block.map_err(|e| de::Error::custom(format_args!("{} block: {e}", kind.name())))
    }
}

#[derive(Clone, Copy)]
enum Known {
    Text,
    Image,
    ToolUse,
    ToolResult,
}

impl Known {
    fn name(self) -> &'static str {
        match self {
            Known::Text => "text",
            Known::Image => "image",
            Known::ToolUse => "tool_use",
            Known::ToolResult => "tool_result",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn content_is_a_string_or_blocks() {
        let m: Message = serde_json::from_value(json!({"role": "user", "content": "hi"})).unwrap();
        assert_eq!(m.content, MessageContent::Text("hi".into()));
        let m: Message = serde_json::from_value(json!({
            "role": "assistant",
            "content": [
                {"type": "text", "text": "a", "citations": null},
                {"type": "thinking", "thinking": "hmm", "signature": "x"},
                {"type": "tool_use", "id": "t1", "name": "f", "input": {"a": 1}}
            ]
        }))
        .unwrap();
        let MessageContent::Blocks(blocks) = &m.content else { panic!("blocks") };
        let kinds: Vec<&str> = blocks.iter().map(ContentBlock::kind).collect();
        assert_eq!(kinds, ["text", "thinking", "tool_use"]);
    }

    #[test]
    fn a_bad_block_says_what_is_wrong() {
        let e = MessagesRequest::from_slice(
            br#"{"model":"m","messages":[{"role":"user","content":[{"type":"text"}]}]}"#,
        )
        .unwrap_err();
        assert!(e.to_string().contains("text block: missing field `text`"), "{e}");
        let e = MessagesRequest::from_slice(br#"{"model":"m","messages":[{"role":"user","content":7}]}"#)
            .unwrap_err();
        assert!(e.to_string().contains("a string or an array of content blocks"), "{e}");
        let e = MessagesRequest::from_slice(br#"{"model":"m","messages":[{"role":"system","content":""}]}"#)
            .unwrap_err();
        assert!(e.to_string().contains("unknown variant `system`"), "{e}");
    }

    #[test]
    fn unknown_fields_are_kept_aside() {
        let r = MessagesRequest::from_slice(
            br#"{"model":"m","messages":[],"max_tokens":5,"service_tier":"auto","stream":true}"#,
        )
        .unwrap();
        assert!(r.is_stream());
        assert_eq!(r.max_tokens, Some(5));
        assert_eq!(r.extra.keys().collect::<Vec<_>>(), ["service_tier"]);
    }

    #[test]
    fn blocks_round_trip() {
        let block = json!({"type": "tool_result", "tool_use_id": "t", "content": [
            {"type": "text", "text": "ok", "cache_control": {"type": "ephemeral"}},
            {"type": "image", "source": {"type": "url", "url": "https://x/y.png"}},
            {"type": "search_result", "title": "?"}
        ], "is_error": true});
        let parsed: ContentBlock = serde_json::from_value(block.clone()).unwrap();
        assert_eq!(serde_json::to_value(&parsed).unwrap(), block);
    }
}

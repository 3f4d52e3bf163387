//! Chat completion → Messages response.

use serde::{Deserialize, Serialize};

use crate::error::TranslateError;
use crate::request::{TextBlock, ToolUseBlock};
use crate::upstream::{self, Completion};

/// A Messages response: `{"type":"message","role":"assistant",…}`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename = "message")]
pub struct MessageResponse {
    /// `msg_…`, from the upstream's id.
    pub id: String,
    /// Always [`AssistantRole::Assistant`].
    pub role: AssistantRole,
    /// The model as the client named it.
    pub model: String,
    /// A text block (when there is text), then the tool calls.
    pub content: Vec<ResponseBlock>,
    /// Why generation stopped.
    pub stop_reason: Option<StopReason>,
    /// The stop sequence that matched, when the upstream says which.
    pub stop_sequence: Option<String>,
    /// Token counts.
    pub usage: Usage,
}

/// The author of every response: `"assistant"`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AssistantRole {
    /// `"assistant"`.
    #[default]
    Assistant,
}

/// A content block of a response.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ResponseBlock {
    /// Text.
    Text(TextBlock),
    /// A tool call.
    ToolUse(ToolUseBlock),
}

/// Why generation stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum StopReason {
    /// The model finished (`finish_reason: stop`).
    EndTurn,
    /// `max_tokens` was reached (`length`).
    MaxTokens,
    /// A stop sequence matched (`stop` with the matched string reported).
    StopSequence,
    /// The model calls tools (`tool_calls`).
    ToolUse,
    /// The upstream's filter stopped it (`content_filter`).
    Refusal,
}

impl StopReason {
    /// Its name on the wire (`end_turn`).
    pub const fn as_str(self) -> &'static str {
        match self {
            StopReason::EndTurn => "end_turn",
            StopReason::MaxTokens => "max_tokens",
            StopReason::StopSequence => "stop_sequence",
            StopReason::ToolUse => "tool_use",
            StopReason::Refusal => "refusal",
        }
    }
}

/// Token counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Usage {
    /// The upstream's `prompt_tokens` (0 when it sent no usage).
    pub input_tokens: u64,
    /// The upstream's `completion_tokens` (0 when it sent no usage).
    pub output_tokens: u64,
}

/// Translates a chat completion (the upstream's JSON body) into a Messages
/// response for `model_shown`, the model name the client asked for.
///
/// - `id`: `msg_` and the upstream id's letters, digits, `-` and `_`
///   (`chatcmpl-abc` → `msg_abc`; a unique `msg_proxypal…` when it has none).
/// - `content`: one text block when the message has text other than
///   whitespace (a list of text parts is joined; a `refusal` stands in for
///   empty content), then one
///   `tool_use` block per tool call (or legacy `function_call`), with the
///   upstream's call id (`toolu_<message>_<n>` when it sent none) and `input`
///   parsed from the arguments string: the object; the inner object when the
///   model double-encoded it; `{}` for blank; otherwise
///   `{"_raw": "<arguments as sent>"}` — never an error.
/// - `stop_reason`: `stop` → `end_turn`; `stop` with a matched stop string
///   (vLLM/NVIDIA NIM `choices[0].stop_reason`, SGLang `matched_stop`) →
///   `stop_sequence` with `stop_sequence` set to it; `length` →
///   `max_tokens`; `tool_calls`/`function_call` → `tool_use` (also when the
///   answer holds tool calls but says `stop` or nothing); `content_filter` →
///   `refusal`; anything else → `end_turn`.
/// - `usage`: `prompt_tokens` and `completion_tokens` (0 when absent).
///
/// Errors: a body that is not JSON, has an `error` object
/// ([`TranslateError::Upstream`]) or no choice.
pub fn from_chat(body: &[u8], model_shown: &str) -> Result<MessageResponse, TranslateError> {
    let completion: Completion = serde_json::from_slice(body)
        .map_err(|e| TranslateError::InvalidResponse { reason: e.to_string() })?;
    if let Some(error) = completion.upstream_error() {
        return Err(error);
    }
    let choice = completion
        .first_choice()
        .ok_or_else(|| TranslateError::InvalidResponse { reason: "no choices".to_owned() })?;
    let id = upstream::message_id(completion.id.as_deref());

    let mut content = Vec::new();
    let message = choice.message.as_ref().or(choice.delta.as_ref());
    if let Some(message) = message {
        let mut text = String::new();
        if let Some(c) = &message.content {
            upstream::content_text(c, &mut text);
        }
        if text.is_empty() {
            if let Some(refusal) = &message.refusal {
                text.push_str(refusal);
            }
        }
        if !text.trim().is_empty() {
            content.push(ResponseBlock::Text(TextBlock::new(text)));
        }
        let calls = message.tool_calls.iter().flatten().filter_map(|c| {
            let function = c.function.as_ref()?;
            Some((c.id.as_deref(), function))
        });
        let legacy = message.function_call.as_ref().map(|f| (None, f));
        for (n, (call_id, function)) in calls.chain(legacy).enumerate() {
            let id = match call_id {
                Some(call_id) if !call_id.is_empty() => call_id.to_owned(),
                _ => upstream::tool_use_id(&id, n),
            };
            content.push(ResponseBlock::ToolUse(ToolUseBlock {
                id,
                name: function.name.clone().unwrap_or_default(),
                input: upstream::parse_arguments(function.arguments.as_ref()),
            }));
        }
    }

    let has_tool_calls = content.iter().any(|b| matches!(b, ResponseBlock::ToolUse(_)));
    let matched = choice.matched_stop();
    let stop_reason = upstream::stop_reason(choice.finish_reason.as_deref(), matched, has_tool_calls);
    let stop_sequence = match stop_reason {
        StopReason::StopSequence => matched.map(str::to_owned),
        _ => None,
    };
    let usage = completion.usage.map_or(Usage::default(), |u| Usage {
        input_tokens: u.prompt_tokens.unwrap_or(0),
        output_tokens: u.completion_tokens.unwrap_or(0),
    });
    Ok(MessageResponse {
        id,
        role: AssistantRole::Assistant,
        model: model_shown.to_owned(),
        content,
        stop_reason: Some(stop_reason),
        stop_sequence,
        usage,
    })
}

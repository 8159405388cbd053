"""The Gradio front end: upload an image, pick regions, chat about them, come back to past chats (no box of the
paper's figure: the user's side of it).

`service.ChatService` holds all behaviour and knows nothing of Gradio; `api` exposes it as named endpoints for
`gradio_client`; `ui` is the browser page, whose handlers are thin wrappers around the same service calls.
"""

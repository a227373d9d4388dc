/** relay's AI SDK endpoints, same origin (Vite's proxy sends /api to relay). */
export const API = '/api/v1/ai-sdk/chat';

/** The URL of one of a chat's endpoints: `/stream`, `/stop`, `/messages`. */
export const chatUrl = (id: string, endpoint: string) => `${API}/${encodeURIComponent(id)}/${endpoint}`;

"""The small vision-language-action model: instruction + camera + proprioception -> action chunk."""
